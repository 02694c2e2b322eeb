"""Real processes for the cache tests: the cache service and stream nodes, each killable.

Every process is the real thing (``python -m services.cache``, a StreamServers wired to the
cache in ``tests/cache/stream_node.py``) on the session's real nats-server; clients are
qemu-io / nbdinfo over real NBD connections.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import nats
import pytest

from shared import bus
from shared.contracts.cache import wire
from shared.contracts.cache.wire import node_subject
from shared.event_store import EventStore
from shared.events import SessionClosed, envelope
from tests.conftest import TEST_ROLE, BusServer

ROOT = Path(__file__).resolve().parents[2]
IMAGE_SIZE = 16 * 1024 * 1024
TIMEOUT = 60


class Proc:
    """A service process of a test (or a benchmark): its stderr in ``log``, its stdout kept
    for the READY line that processes which print one end their start with."""

    def __init__(
        self, args: list[str], env: dict[str, str] | None = None, log: Path | None = None
    ) -> None:
        self.log = log
        self.logf = open(log or os.devnull, "ab")  # closed in stop()
        self.p = subprocess.Popen(
            args, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
            stderr=self.logf,
        )  # fmt: skip

    def ready_line(self) -> list[str]:
        assert self.p.stdout is not None
        line = self.p.stdout.readline().decode()
        logged = self.log.read_text() if self.log else ""
        assert line.startswith("READY"), f"not ready: {line!r}; log:\n{logged}"
        return line.split()[1:]

    def kill9(self) -> None:
        self.p.send_signal(signal.SIGKILL)
        self.p.wait(10)
        self.logf.close()

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(15)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)
        self.logf.close()


def rss_mib(pid: int) -> float:
    """Resident memory of process ``pid`` (VmRSS), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"process {pid}: no VmRSS")


async def cache_request(nats_url: str, subject: str, body: dict[str, Any]) -> Any:
    nc = await nats.connect(nats_url)
    try:
        msg = await nc.request(subject, json.dumps(body).encode(), timeout=10)
        return json.loads(msg.data)
    finally:
        await nc.close()


async def ensure_event_stream(nats_url: str) -> None:
    """The event stream, which the registry makes: the cache follows closes there."""
    nc = await nats.connect(nats_url)
    try:
        await bus.ensure_event_stream(nc.jetstream())
    finally:
        await nc.close()


class System:
    """The cache nodes + stream nodes of one test, under one folder.

    The default cache node (``start_cache()``) uses ``data``, ``shm`` and ``cache.log``;
    a named one (``start_cache("b")``) ``data-b``, ``shm-b`` and ``cache-b.log``, with its
    own node id (:meth:`node_id`): several cache nodes, each holding its own caches."""

    def __init__(self, bus: BusServer, root: Path, env: dict[str, str]) -> None:
        self.bus = bus
        # What the test itself does on the bus (requests, stats): the `test` user.
        self.nats_url = bus.url_for(TEST_ROLE)
        self.root = root
        self.data = root / "data"
        # Node ids unique over the whole run (the NATS server and its KV outlive a test).
        self.id_prefix = f"cache-{root.parent.name}-{root.name}"
        # Each process runs as its own role's NATS user (the cache's here).
        self.env = {
            **bus.env("cache"),
            "STREAMBOOT_DATA_DIR": str(self.data),
            "STREAMBOOT_CACHE_RAM_DIR": str(root / "shm"),
            "STREAMBOOT_NODE_ID": self.id_prefix,
            "STREAMBOOT_METRICS_PORT": "0",
            "STREAMBOOT_HEARTBEAT_INTERVAL_S": "1",
            **env,
        }
        self.procs: list[Proc] = []
        self.registry: Proc | None = None
        self.cache: Proc | None = None
        self.caches: dict[str, Proc] = {}

    def node_id(self, name: str = "") -> str:
        return f"{self.id_prefix}-{name}" if name else self.id_prefix

    def cache_log(self, name: str = "") -> Path:
        return self.root / (f"cache-{name}.log" if name else "cache.log")

    async def start_cache(self, name: str = "", **settings: str) -> Proc:
        """A cache node; ``settings`` override its own (``cache_min_free_bytes="1"``)."""
        env = {**self.env, **{f"STREAMBOOT_{k.upper()}": v for k, v in settings.items()}}
        if name:
            env["STREAMBOOT_DATA_DIR"] = str(self.root / f"data-{name}")
            env["STREAMBOOT_CACHE_RAM_DIR"] = str(self.root / f"shm-{name}")
            env["STREAMBOOT_NODE_ID"] = self.node_id(name)
        log = self.cache_log(name)
        self.cache = proc = Proc([sys.executable, "-m", "services.cache"], env, log)
        self.caches[name] = proc
        self.procs.append(proc)
        # Ready when it answers on its own subjects.
        subject = node_subject(self.node_id(name), wire.V_STATS)
        for _ in range(300):
            try:
                await cache_request(self.nats_url, subject, {})
                return proc
            except Exception:
                assert proc.p.poll() is None, log.read_text()
                await asyncio.sleep(0.1)
        raise AssertionError("cache service never answered")

    async def start_node(
        self, exports: dict[str, dict[str, Any]], name: str, *extra: str
    ) -> tuple[Proc, str]:
        path = self.root / f"exports-{name}.json"
        path.write_text(json.dumps(exports))
        # A node that publishes events plays the registry's relay too: the `test` user.
        role = TEST_ROLE if "--publish-events" in extra else "stream"
        url = self.bus.url_for(role)
        node = Proc(
            [sys.executable, "-m", "tests.cache.stream_node", url, str(path), *extra],
            self.env,
            self.root / f"{name}.log",
        )
        self.procs.append(node)
        port = (await asyncio.to_thread(node.ready_line))[0]
        return node, f"nbd://127.0.0.1:{port}"

    async def start_registry(self, database_url: str) -> Proc:
        """The real registry (event log + relay): the cache's events go through it."""
        from streamboot.embedded.proc import free_port

        env = {**self.env, **self.bus.env("registry"), "STREAMBOOT_DATABASE_URL": database_url}
        env["STREAMBOOT_API_PORT"] = str(free_port())
        reg = Proc([sys.executable, "-m", "services.registry"], env, self.root / "registry.log")
        self.procs.append(reg)
        self.registry = reg
        log = self.root / "registry.log"
        for _ in range(300):
            if "serving API" in log.read_text():
                return reg
            assert reg.p.poll() is None, log.read_text()
            await asyncio.sleep(0.1)
        raise AssertionError("registry never started")

    async def close_session(self, database_url: str, session_id: str) -> None:
        """A session's close as the registry makes it: into the log, which its relay then
        publishes (the cache confirms a close with the registry before it drops a cache)."""
        if self.registry is None:
            await self.start_registry(database_url)
        store = await EventStore.connect(database_url)
        try:
            await store.append([envelope(SessionClosed(session_id=session_id, reason="t"))])
        finally:
            await store.close()

    async def stats(self) -> Any:
        return await cache_request(self.nats_url, wire.STATS, {})

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()


@pytest.fixture
async def system(nats_server: BusServer, tmp_path: Path) -> AsyncIterator[Callable[..., System]]:
    made: list[System] = []
    await ensure_event_stream(nats_server.url_for(TEST_ROLE))

    def make(**env: str) -> System:
        s = System(
            nats_server,
            tmp_path / f"sys{len(made)}",
            {f"STREAMBOOT_{k.upper()}": v for k, v in env.items()},
        )
        s.root.mkdir()
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()


@pytest.fixture(scope="module")
def base_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # In the vdisk's own folder: layers are read from nowhere else (shared/layer_paths.py).
    path = tmp_path_factory.mktemp("vdisk") / "golden" / "base.raw"
    path.parent.mkdir()
    path.write_bytes(os.urandom(IMAGE_SIZE))
    return path


def export(token: str, base: Path, **kw: Any) -> dict[str, dict[str, Any]]:
    fields = {
        "session_id": f"session-{token}",
        "vdisk": "golden",
        "version": 1,
        "layers": [str(base)],
        "size": IMAGE_SIZE,
        "write_cache": "server-disk",
        **kw,
    }
    return {token: fields}


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)
    if check:
        assert out.returncode == 0, f"{cmd} failed:\n{out.stdout}\n{out.stderr}"
    return out


def qemu_io(uri: str, *commands: str, expect_error: bool = False) -> str:
    args = ["qemu-io", "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    out = run(*args, uri, check=not expect_error)
    text = out.stdout + out.stderr
    assert "Pattern verification failed" not in text, text
    if not expect_error:
        assert "error" not in text.lower(), text
    return text
