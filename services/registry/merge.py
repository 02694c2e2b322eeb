"""A vdisk's chain of layers written out as one base layer, and the old layers' removal.

``streamboot vdisk merge NAME [--upto VERSION]`` (or the automatic merge,
``STREAMBOOT_VDISK_AUTO_MERGE_LAYERS``) runs in the registry, on its local store:

1. :func:`merge_lock`: one merge per vdisk at a time, across every registry process that
   shares the store (an ``flock`` on ``<vdisk>/.merge.lock``);
2. :func:`stage_base`: read the version's chain and write it as a sparse raw image into a
   staging dir, fsync it and hash it: the registry publishes it only if its sha256 is the
   version's own checksum (block for block the same content);
3. the registry moves it into place beside the old layers (``vdisk_store.commit_staged``)
   and appends ``VdiskChainMerged`` under its append lock;
4. :func:`remove_layers`: once no session that was live at the merge still lives, the
   superseded files are deleted (``VdiskLayersRemoved``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from services.registry.domain.errors import conflict
from shared import vdisk_store
from shared.layer_paths import check_layer_file
from shared.vdisk_layout import delta_paths, is_delta
from shared.vdisk_store import Progress, _no_progress, hash_file, new_staging

LOCK_FILE = ".merge.lock"


@contextlib.contextmanager
def merge_lock(root: Path, name: str) -> Iterator[None]:
    """Held for a whole merge; a second merge of the vdisk (this process or another
    registry on the same store) is refused at once rather than queued."""
    vdir = root / name
    vdir.mkdir(mode=vdisk_store.DIR_MODE, parents=True, exist_ok=True)
    fd = os.open(vdir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise conflict(
                f"a merge of vdisk {name!r} is already running: wait for it to finish"
            ) from None
        yield
    finally:
        os.close(fd)  # releases the lock


def base_name(name: str, version: int) -> str:
    """The store-relative path of version ``version``'s merged base."""
    return f"{name}/v{version}.base.raw"


def stage_base(
    root: Path, name: str, layers: list[str], version: int, progress: Progress = _no_progress
) -> tuple[str, str]:
    """Write the chain ``layers`` (files) as one raw image in a new staging dir, durable;
    returns ``(staging dir name, "sha256:<hex>")``."""
    staging = new_staging(root, name)
    try:
        out = staging / Path(base_name(name, version)).name
        size = vdisk_store.materialise([Path(p) for p in layers], out, progress)
        fd = os.open(out, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(out, vdisk_store.FILE_MODE)
        return staging.name, f"sha256:{hash_file(out, size, progress)}"
    except BaseException:
        vdisk_store.discard_staged(root, name, staging.name)
        raise


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def layer_files(root: Path, name: str, layers: list[str]) -> list[Path]:
    """The files of store-relative layers (a delta is its ``.map`` and ``.data``), each
    checked to be a file of the vdisk's own folder."""
    files = []
    for rel in layers:
        path = check_layer_file(root / rel, name, root, follow_links=False)
        files.extend(delta_paths(path.with_suffix("")) if is_delta(rel) else [path])
    return files


def allocated_bytes(files: list[Path]) -> int:
    """What the files take on disk (sparse layers take less than their size)."""
    total = 0
    for f in files:
        with contextlib.suppress(FileNotFoundError):
            total += os.stat(f).st_blocks * 512
    return total


def remove_layers(root: Path, name: str, layers: list[str]) -> None:
    """Delete superseded layer files (those already gone are fine: a removal that died
    before its event is done again)."""
    for f in layer_files(root, name, layers):
        f.unlink(missing_ok=True)
    fsync_dir(root / name)
