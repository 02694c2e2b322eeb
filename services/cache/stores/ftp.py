"""An FTP file share through aioftp: ranged reads with ``REST`` + ``RETR``.

A small pool of logged-in control connections is kept (a login costs several round
trips); a read takes one, asks ``REST offset`` then ``RETR`` and reads ``length`` bytes.
A read that ends at the end of the file lets the transfer finish (226) and the connection
goes back to the pool; a read that stops earlier closes its control connection too: FTP
has no clean way to stop a transfer half way (``ABOR`` races with a server that already
noticed the closed data connection), and a fresh login costs less than a stuck reply.
A connection that fails is dropped and the read retried once on a fresh one; if the server
is gone, the reader gets a :class:`StoreError` naming the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import posixpath

import aioftp

from services.cache.stores import StoreError
from shared.layer_paths import check_relative_layer

POOL = 4


class FtpStore:
    def __init__(self, host: str, port: int, user: str, password: str, root: str = "/") -> None:
        self.host, self.port, self.user, self.password = host, port, user, password
        self.root = root or "/"
        self.url = f"ftp://{user}@{host}:{port}{self.root}"
        self._idle: list[aioftp.Client] = []
        self._slots = asyncio.Semaphore(POOL)
        self._sizes: dict[str, int] = {}

    def layer(self, vdisk: str, path: str) -> str:
        return check_relative_layer(path, vdisk)

    def _path(self, path: str) -> str:
        return path if path.startswith("/") else posixpath.join(self.root, path)

    async def _connect(self) -> aioftp.Client:
        client = aioftp.Client(socket_timeout=30)
        try:
            await client.connect(self.host, self.port)
            await client.login(self.user, self.password)
        except (OSError, aioftp.StatusCodeError) as e:
            client.close()
            raise StoreError(errno.EIO, f"{self.url}: cannot connect: {e}") from e
        return client

    async def _with_client(self, op):  # type: ignore[no-untyped-def]
        """Run ``op(client) -> (result, reusable)`` on a pooled connection."""
        async with self._slots:
            for attempt in (0, 1):
                client = self._idle.pop() if self._idle else await self._connect()
                try:
                    result, reusable = await op(client)
                except (OSError, aioftp.StatusCodeError, asyncio.IncompleteReadError) as e:
                    client.close()
                    if attempt or isinstance(e, aioftp.StatusCodeError):
                        raise StoreError(errno.EIO, f"{self.url}: {e}") from e
                    continue  # a stale pooled connection: once more on a fresh one
                if reusable:
                    self._idle.append(client)
                else:
                    client.close()
                return result
        raise AssertionError("unreachable")

    async def size(self, path: str) -> int:
        p = self._path(path)
        if p not in self._sizes:

            async def stat(client: aioftp.Client) -> tuple[int, bool]:
                info = await client.stat(p)
                return int(info["size"]), True

            self._sizes[p] = await self._with_client(stat)
        return self._sizes[p]

    async def read(self, path: str, offset: int, length: int) -> bytes:
        p = self._path(path)
        to_end = offset + length >= await self.size(path)

        async def ranged(client: aioftp.Client) -> tuple[bytes, bool]:
            buf = bytearray()
            # aioftp sends REST after PASV (which resets the server's restart offset).
            stream = await client.download_stream(p, offset=offset)
            if to_end:
                async for chunk in stream.iter_by_block(256 * 1024):
                    buf += chunk
                await stream.finish()
                return bytes(buf[:length]), True
            try:
                while len(buf) < length:
                    chunk = await stream.read(length - len(buf))
                    if not chunk:
                        break
                    buf += chunk
            finally:
                stream.close()
            return bytes(buf), False

        data = await self._with_client(ranged)
        return data + bytes(length - len(data))  # past the end reads as zeros

    async def close(self) -> None:
        for client in self._idle:
            with contextlib.suppress(Exception):
                client.close()
        self._idle.clear()
