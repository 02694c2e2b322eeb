"""A local directory store: layer files read with ``pread`` in a worker thread."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from services.cache.stores import StoreError
from shared.layer_paths import check_layer_file


class LocalStore:
    def __init__(self, root: str) -> None:
        self.root = Path(root)
        self.url = f"file://{self.root}"
        self._fds: dict[str, int] = {}

    def layer(self, vdisk: str, path: str) -> str:
        return str(check_layer_file(path, vdisk, self.root))

    def _path(self, path: str) -> Path:
        p = Path(path)
        return p if p.is_absolute() else self.root / p

    def _fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = os.open(self._path(path), os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise StoreError(e.errno, f"{self.url}: {path}: {e.strerror}") from e
            self._fds[path] = fd
        return fd

    async def size(self, path: str) -> int:
        # lseek, not fstat: a block device's st_size is 0.
        return os.lseek(self._fd(path), 0, os.SEEK_END)

    def _read(self, path: str, offset: int, length: int) -> bytes:
        data = os.pread(self._fd(path), length, offset)
        return data + bytes(length - len(data))  # past the end reads as zeros

    async def read(self, path: str, offset: int, length: int) -> bytes:
        try:
            return await asyncio.to_thread(self._read, path, offset, length)
        except StoreError:
            raise
        except OSError as e:
            raise StoreError(e.errno, f"{self.url}: {path}: {e.strerror}") from e

    async def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
