"""Registry fixtures: the real registry service (in this test's event loop) on the real NATS
and a fresh PostgreSQL database, and an application layer alone for app-level tests."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.registry import service
from services.registry.app import RegistryApp
from shared import bus
from shared.event_store import EventStore
from shared.heartbeat import HeartbeatView
from shared.settings import API_TOKEN_FILE, RUNTIME_FILE, Settings, nats_password_file
from streamboot.embedded.datadir import LOCK_FILE
from streamboot.embedded.proc import free_port
from tests.conftest import BusServer

TOKEN = "test-token-" + "x" * 20


# Session opens in these tests may wait past the production deadline on a loaded test
# machine and be refused busy; back-pressure has its own tests (test_back_pressure.py).
PATIENT = {"registry_open_max_wait_s": 120.0}


def make_settings(data_dir: Path, nats_url: str, database_url: str, **extra: Any) -> Settings:
    return Settings(
        **PATIENT,
        data_dir=data_dir,
        nats_url=nats_url,
        database_url=database_url,
        api_port=free_port(),
        api_token=TOKEN,
        node_id=f"registry-test-{os.getpid()}",
        # The sweeper is driven by the tests (app.sweep(now=...)), not by the clock.
        session_sweep_interval_s=3600,
        **extra,
    )


@dataclass
class Registry:
    settings: Settings
    app: RegistryApp
    api_url: str
    data_dir: Path
    bus: BusServer  # the services a test starts beside it connect as their own roles
    beats: HeartbeatView | None = None  # the registry service's (None: no service)

    async def sees(
        self, service: str, node: str, *, alive: bool = True, timeout_s: float = 10.0
    ) -> None:
        """Until the registry's heartbeat view shows that instance alive (or not): the
        view is a watch, which gets a heartbeat a moment after it is put."""
        from tests.conftest import wait_for

        def shown() -> bool:
            assert self.beats is not None
            beats = self.beats.read_now()
            return alive == any(
                b["service"] == service and b["node"] == node and b["alive"] for b in beats
            )

        await wait_for(
            shown, f"the registry to see {service} {node} {'alive' if alive else 'gone'}"
        )

    def http(self, token: str | None = TOKEN) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.AsyncClient(base_url=self.api_url, headers=headers, timeout=30)

    async def cli(
        self, *args: str, timeout_s: float = 120, env: dict[str, str] | None = None
    ) -> tuple[int, str, str]:
        """Run the real `streamboot` CLI against this registry (without blocking the loop
        that serves it); ``env`` adds STREAMBOOT_ settings (another API token...)."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "from streamboot.cli import main; main()", *args, "--data-dir", str(self.data_dir),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={k: v for k, v in os.environ.items() if not k.startswith("STREAMBOOT_")} | (env or {}),
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    async def cli_json(self, *args: str) -> Any:
        code, out, err = await self.cli(*args, "--json")
        assert code == 0, f"streamboot {' '.join(args)} failed ({code}): {err}"
        return json.loads(out)


@pytest.fixture
def data_dir() -> Any:
    # Under /tmp: the CLI subprocess and qemu-img read it.
    path = Path(tempfile.mkdtemp(prefix="streamboot-registry-test-"))
    yield path
    import shutil

    shutil.rmtree(path, ignore_errors=True)


async def start_registry(settings: Settings) -> service.RegistryService:
    svc = service.RegistryService(settings)
    await svc.start()
    url = f"http://127.0.0.1:{settings.api_port}/health"
    async with httpx.AsyncClient() as http:
        for _ in range(300):
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(url)).status_code == 200:
                    return svc
            await asyncio.sleep(0.05)
    await svc.stop()
    raise TimeoutError("registry API did not come up")


@pytest.fixture
async def registry(
    nats_server: BusServer, database_url: str, data_dir: Path
) -> AsyncIterator[Registry]:
    # The registry runs as its role's NATS user; the CLI finds the `cli` user's password
    # where `up` keeps it.
    bus_settings = nats_server.settings("registry")
    settings = make_settings(data_dir, database_url=database_url, **bus_settings)
    svc = await start_registry(settings)
    api_url = f"http://127.0.0.1:{settings.api_port}"
    (data_dir / RUNTIME_FILE).write_text(
        json.dumps({"api_url": api_url, "nats_url": nats_server.url})
    )
    # The fixture stands in for `up`: it holds up's lock too, so the CLI takes
    # runtime.json as live (a runtime.json without it is a killed `up`'s).
    up_lock = open(data_dir / LOCK_FILE, "w")  # noqa: ASYNC230 (a local file, once)
    fcntl.flock(up_lock, fcntl.LOCK_EX)
    cli_password = nats_password_file(data_dir, "cli")
    cli_password.parent.mkdir(mode=0o700, exist_ok=True)
    cli_password.write_text(nats_server.passwords["cli"] + "\n")
    fd = os.open(data_dir / API_TOKEN_FILE, os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(TOKEN + "\n")
    try:
        yield Registry(settings, svc.app, api_url, data_dir, nats_server, svc.beats)
    finally:
        await svc.stop()
        up_lock.close()


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[EventStore]:
    s = await EventStore.connect(database_url)
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def app(store: EventStore, data_dir: Path) -> RegistryApp:
    """The application layer on a real event store, without NATS or HTTP."""
    a = RegistryApp(store, Settings(data_dir=data_dir, api_token=TOKEN, **PATIENT))
    await a.start()
    return a


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[Any]:
    conn = await bus.connect(nats_url, "registry-test")
    try:
        yield conn
    finally:
        await conn.close()


def write_image(path: Path, size: int, patches: dict[int, bytes]) -> Path:
    """A sparse raw image with some bytes written at offsets."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in patches.items():
            f.seek(offset)
            f.write(data)
    return path


KERNEL = b"fake kernel " * 5000
INITRD = b"fake initramfs " * 9000


def write_bootable_image(path: Path, version: str = "6.1.0-12-amd64") -> Path:
    """A GPT disk (sfdisk) with one ext4 root (mke2fs -d, no mount) holding /etc and a
    Debian-style /boot: what the registry finds kernels in."""
    import subprocess

    with open(path, "wb") as f:
        f.truncate(24 << 20)
    subprocess.run(["sfdisk", "-q", str(path)], input="label: gpt\nstart=2048, type=linux\n",
                   text=True, check=True)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "boot").mkdir()
        (root / "etc").mkdir()
        (root / "boot" / f"vmlinuz-{version}").write_bytes(KERNEL)
        (root / "boot" / f"initrd.img-{version}").write_bytes(INITRD)
        subprocess.run(["mke2fs", "-q", "-t", "ext4", "-d", str(root), "-E", "offset=1048576",
                        str(path), "20M"], check=True)  # fmt: skip
    return path
