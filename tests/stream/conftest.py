"""Fixtures for the stream data plane: a StreamServers running on uvloop in its own thread.

The real clients (qemu-img, qemu-io, nbdinfo, nbdcopy, curl) are plain blocking
subprocesses, so the server gets its own event loop (uvloop, as in production) in a
thread; events go to a ListSink read through that loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

from services.stream.server import StreamServers
from services.stream.settings import StreamSettings
from services.stream.spec import ExportSpec
from shared.events import Event
from shared.vdisk_layout import write_delta
from tests.doubles import ListSink, StaticResolver

IMAGE_SIZE = 32 * 1024 * 1024


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def is_open(fd: int) -> bool:
    """Whether ``fd`` is still an open descriptor of this process."""
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


class ServerThread:
    """StreamServers on a uvloop loop in a daemon thread."""

    def __init__(self, exports: dict[str, ExportSpec], settings: StreamSettings) -> None:
        self.sink = ListSink()
        self.resolver = StaticResolver(exports)
        self.settings = settings
        self.loop = uvloop.new_event_loop()
        self.servers = StreamServers(self.resolver, self.sink, settings)
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> None:
        self._thread.start()
        self.call(self.servers.start)

    def call(self, fn: Callable[[], Any], timeout: float = 30) -> Any:
        async def run() -> Any:
            result = fn()
            return await result if asyncio.iscoroutine(result) else result

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def events(self, cls: type[Event] | None = None) -> list[Event]:
        async def snapshot() -> list[Event]:
            await self.servers.sessions.drain_events()
            return [e for e, _ in self.sink.events if cls is None or isinstance(e, cls)]

        return self.call(snapshot)

    def wait_until(self, check: Callable[[], Any], what: str, timeout_s: float = 5.0) -> None:
        """Until ``check()`` (run on the server's loop) is true; fails naming ``what``."""
        deadline = time.monotonic() + timeout_s
        while not self.call(check):
            assert time.monotonic() < deadline, what
            time.sleep(0.01)

    def wait_idle(self, timeout_s: float = 10.0) -> None:
        """Until every connection has ended here: a client program that has exited may
        not have had its socket's end read by the server yet."""
        self.wait_until(
            lambda: not self.servers.sessions.connections, "connections still open", timeout_s
        )

    def live_sessions(self) -> set[str]:
        return self.call(lambda: {s.session_id for s in self.servers.sessions.sessions.values()})

    def stop(self) -> None:
        self.call(self.servers.stop)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    @property
    def nbd(self) -> str:
        return f"nbd://127.0.0.1:{self.servers.nbd_port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.servers.http_port}"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """A random base image, a changed copy of it stored as a delta, and their checksums.

    Teardown asserts the base image is unchanged by everything the module did.
    """
    d = tmp_path_factory.mktemp("vdisk")
    base = d / "base.raw"
    base.write_bytes(os.urandom(IMAGE_SIZE))
    v2 = d / "v2-full.raw"
    data = bytearray(base.read_bytes())
    data[100_000:100_100] = b"\x5a" * 100  # one block changed
    data[20 * 1024 * 1024 : 21 * 1024 * 1024] = bytes(1024 * 1024)  # a zeroed MiB
    v2.write_bytes(data)
    assert write_delta([base], v2, d / "v2") > 0
    before = sha256(base)
    yield {"base": base, "v2_full": v2, "v2_map": d / "v2.map", "dir": d}
    assert sha256(base) == before, "the shared vdisk image was modified"


def spec(token: str, images: dict[str, Path], **kw: Any) -> ExportSpec:
    layers = kw.pop("layers", (images["base"],))
    return ExportSpec(
        session_id=f"session-{token}",
        vdisk="golden",
        version=len(layers),
        layers=tuple(layers),
        size=IMAGE_SIZE,
        **kw,
    )


@pytest.fixture(scope="module")
def make_server(images: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Factory: a started ServerThread with the standard exports (stopped at module end).

    Tokens: ``tok-a``, ``tok-b`` (RAM / disk write cache, separate sessions), ``tok-ro``
    (client-side write cache: read-only), ``tok-v2`` (base + delta chain).
    """
    started: list[ServerThread] = []

    def make(**settings: Any) -> ServerThread:
        exports = {
            "tok-a": spec("tok-a", images, write_cache="server-ram"),
            "tok-b": spec("tok-b", images, write_cache="server-disk"),
            "tok-ro": spec("tok-ro", images, write_cache="client-ram"),
            "tok-v2": spec("tok-v2", images, layers=(images["base"], images["v2_map"])),
        }
        st = StreamSettings(
            nbd_port=0,
            http_port=0,
            node_id="test-node",
            write_cache_dir=tmp_path_factory.mktemp("wc"),
            **settings,
        )
        server = ServerThread(exports, st)
        server.start()
        started.append(server)
        return server

    yield make
    for s in started:
        s.stop()
