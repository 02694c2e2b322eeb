"""The local vdisk store with real qemu-img: formats, staging, deltas, commit, cleanup."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from services.registry.domain.errors import DomainError
from shared import vdisk_store
from shared.vdisk_layout import open_chain
from tests.registry.conftest import write_image

MiB = 1 << 20


def test_formats_and_refusals(tmp_path: Path) -> None:
    raw = write_image(tmp_path / "a.raw", 2 * MiB, {0: b"x"})
    assert vdisk_store.image_format(raw) == ("raw", 2 * MiB)
    qcow = tmp_path / "a.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow), "3M"], check=True)
    assert vdisk_store.image_format(qcow) == ("qcow2", 3 * MiB)
    (tmp_path / "odd").write_bytes(b"abc")
    (tmp_path / "empty").write_bytes(b"")
    for name, message in (
        ("odd", "not a disk image"),
        ("empty", "not a disk image"),
        ("nope", "no such file"),
    ):
        with pytest.raises(DomainError, match=message):
            vdisk_store.image_format(tmp_path / name)
    with pytest.raises(DomainError, match="not a regular file"):
        vdisk_store.image_format(tmp_path)


def test_stage_commit_delta_chain(tmp_path: Path) -> None:
    root = tmp_path / "store"
    v1 = write_image(tmp_path / "1.raw", 12 * MiB, {0: b"one", 9 * MiB: b"tail"})
    phases: list[str] = []
    s1 = vdisk_store.stage_version(root, "d", v1, 1, [], lambda ph, _d, _t: phases.append(ph))
    assert "copy" in phases and s1.layer == "d/v1.raw"
    vdisk_store.commit_staged(root, "d", s1.staging, s1.layer)
    base = root / "d" / "v1.raw"
    assert base.read_bytes() == v1.read_bytes()
    assert os.stat(base).st_blocks * 512 <= 8 * MiB  # the zero chunk stayed a hole
    v2 = write_image(
        tmp_path / "2.raw", 13 * MiB, {0: b"two", 9 * MiB: b"tail", 12 * MiB: b"grown"}
    )
    s2 = vdisk_store.stage_version(root, "d", v2, 2, [base])
    assert s2.changed_blocks == 2 and s2.size == 13 * MiB and s2.layer == "d/v2.map"
    vdisk_store.commit_staged(root, "d", s2.staging, s2.layer)
    assert sorted(p.name for p in (root / "d").iterdir()) == ["v1.raw", "v2.data", "v2.map"]
    with open_chain([base, root / "d" / "v2.map"]) as chain:
        assert chain.pread(0, 13 * MiB) == v2.read_bytes()
    # The same image again is not a new version, and leaves nothing behind.
    with pytest.raises(DomainError, match="identical to version 2"):
        vdisk_store.stage_version(root, "d", v2, 3, [base, root / "d" / "v2.map"])
    assert sorted(p.name for p in (root / "d").iterdir()) == ["v1.raw", "v2.data", "v2.map"]


def test_discard_and_stale_staging(tmp_path: Path) -> None:
    root = tmp_path / "store"
    s = vdisk_store.stage_version(root, "d", write_image(tmp_path / "a", MiB, {}), 1, [])
    vdisk_store.discard_staged(root, "d", s.staging)
    assert list((root / "d").iterdir()) == []
    with pytest.raises(DomainError, match="bad staging dir name"):
        vdisk_store.commit_staged(root, "d", "../../etc", "d/v1.raw")
    old = root / "d" / ".staging-old"
    old.mkdir()
    os.utime(old, (0, 0))
    fresh = root / "d" / ".staging-new"
    fresh.mkdir()
    assert vdisk_store.drop_stale_staging(root) == [old]
    assert fresh.exists()
