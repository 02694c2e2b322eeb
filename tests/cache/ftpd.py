"""aioftp's own FTP server with an artificial delay per transfer: a slow, far-away store.

    python -m tests.cache.ftpd ROOT PORT DELAY_S      # prints READY, serves until killed

Used by the cache tests (in process) and by bench/bootstorm.py (as a process).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aioftp

USER, PASSWORD = "sb", "secret"


class SlowFtpServer(aioftp.Server):
    """Every RETR waits ``delay_s`` first."""

    def __init__(self, *args: Any, delay_s: float = 0.0, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.delay_s = delay_s
        self.retrs = 0

    async def retr(self, connection, rest):  # type: ignore[no-untyped-def,override]
        self.retrs += 1
        await asyncio.sleep(self.delay_s)
        return await super().retr(connection, rest)


@asynccontextmanager
async def ftp_server(root: Path, port: int, delay_s: float) -> AsyncIterator[SlowFtpServer]:
    user = aioftp.User(
        USER, PASSWORD, base_path=root, home_path="/", permissions=[aioftp.Permission("/")]
    )
    server = SlowFtpServer([user], delay_s=delay_s)
    await server.start("127.0.0.1", port)
    try:
        yield server
    finally:
        await server.close()


def url(port: int) -> str:
    return f"ftp://{USER}:{PASSWORD}@127.0.0.1:{port}/"


async def _main(root: str, port: int, delay_s: float) -> None:
    async with ftp_server(Path(root), port, delay_s):
        print("READY", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.CRITICAL)  # aborted transfers are normal here
    asyncio.run(_main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))
