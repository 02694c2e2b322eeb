"""A block-device store (SAN LUN): the device itself is the layer; a file may stand in."""

from __future__ import annotations

import stat
from pathlib import Path

from services.cache.stores import StoreError
from services.cache.stores.local import LocalStore
from shared.layer_paths import check_layer_file


class BlockDeviceStore(LocalStore):
    """Reads layers by their absolute device paths (``/dev/...``; a regular file in tests)."""

    def __init__(self, root: str) -> None:
        super().__init__(root or "/")
        self.url = f"blockdev://{self.root}"

    def layer(self, vdisk: str, path: str) -> str:
        # <root>/<vdisk>/<layer> is a device node or a link to one, by design.
        return str(check_layer_file(path, vdisk, self.root, follow_links=False))

    def _path(self, path: str) -> Path:
        p = super()._path(path)
        try:
            mode = p.stat().st_mode
        except OSError as e:
            raise StoreError(e.errno, f"{self.url}: {p}: {e.strerror}") from e
        if not (stat.S_ISBLK(mode) or stat.S_ISREG(mode)):
            raise StoreError(f"{self.url}: {p} is neither a block device nor a file")
        return p
