"""Where vdisk layer files live, as seen by the cache service: one small class per kind.

A store reads byte ranges of a layer file named by its path (relative to the store root, or
the device path for a block device). ``open_store(url)``:

- ``file:///srv/vdisks`` (or a plain path): a local directory  -> :class:`LocalStore`
- ``blockdev:///dev/sdb``: a block device (a file stands in for it in tests) -> :class:`BlockDeviceStore`
- ``ftp://user:pass@host:port/root``: an FTP share, ranged reads with REST -> :class:`FtpStore`
"""

from __future__ import annotations

from typing import Protocol
from urllib.parse import unquote, urlparse


class StoreError(OSError):
    """The store could not deliver (gone, refused, short): the reader gets EIO."""


class Store(Protocol):
    url: str

    def layer(self, vdisk: str, path: str) -> str:
        """``path`` if it names a file of ``vdisk``'s own folder in this store, else
        ``LayerPathError`` (shared/layer_paths.py): nothing else is ever read."""
        ...

    async def size(self, path: str) -> int: ...
    async def read(self, path: str, offset: int, length: int) -> bytes: ...
    async def close(self) -> None: ...


def open_store(url: str) -> Store:
    from services.cache.stores.blockdev import BlockDeviceStore
    from services.cache.stores.ftp import FtpStore
    from services.cache.stores.local import LocalStore

    u = urlparse(url)
    if u.scheme in ("", "file"):
        return LocalStore(unquote(u.path))
    if u.scheme == "blockdev":
        return BlockDeviceStore(unquote(u.path))
    if u.scheme == "ftp":
        return FtpStore(
            u.hostname or "127.0.0.1",
            u.port or 21,
            unquote(u.username or "anonymous"),
            unquote(u.password or ""),
            unquote(u.path or "/"),
        )
    raise ValueError(f"unknown store URL scheme {u.scheme!r} in {url!r}")
