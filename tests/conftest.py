"""Session-wide real servers for tests: a nats-server and a PostgreSQL on free loopback ports.

They are started with the same `streamboot.embedded` modules as `streamboot up`, under a
temp folder, so tests never touch servers that happen to run on the machine.

- `nats_server` (session): the nats-server, JetStream on, with the authorization `up` gives
  it (shared/bus_access.py: a user per role, anonymous clients refused) plus a `test` user
  that may do anything (tests only): `.url` (no credentials), `.url_for(role)`,
  `.env(role)` / `.settings(role)` for a service a test starts (its own role's user, so a
  missing permission shows), `.credentials(role)`.
  Stopping it fails on any permission violation it logged (but those of clients named
  `violator...`, which break a rule on purpose).
- `nats_url` (session): nats://test:PASSWORD@127.0.0.1:PORT, the `test` user's URL.
- `postgres_dsn` (session): server-level DSN (the `postgres` maintenance database,
  superuser, its scram-sha-256 password in it).
- `database_url` (function): a fresh empty database per test, dropped afterwards.

And `wait_for`, for a test that waits on something another process or task does.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import os
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from shared.bus_access import ROLES, Grant, NatsUser, role_users
from shared.settings import Settings
from streamboot.embedded.nats import EmbeddedNats
from streamboot.embedded.postgres import EmbeddedPostgres
from streamboot.embedded.proc import free_port


async def wait_for(check: Callable[[], Any], what: str, timeout_s: float = 10.0) -> None:
    """Until ``check()`` (or what it returns, if awaitable) is true."""
    for _ in range(int(timeout_s / 0.05)):
        result = check()
        if await result if inspect.isawaitable(result) else result:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def traversable_tmpdir(prefix: str) -> Path:
    """A temp dir under /tmp itself: under root pytest's own tmp base is 0700, and the
    embedded postgres runs as an unprivileged user that must reach its data."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o711)  # mkdtemp makes it 0700
    return path


@pytest.fixture(scope="session")
def servers_root() -> Iterator[Path]:
    root = traversable_tmpdir("streamboot-test-servers-")
    yield root
    shutil.rmtree(root, ignore_errors=True)


# Tests only: a user that may publish and subscribe anything, for what a test drives by
# hand (requests to a service, events it plays the relay for, streams it makes).
TEST_ROLE = "test"
TEST_GRANT = Grant(publish=(">",), subscribe=(">",), responds=True)


@dataclass
class BusServer:
    """A nats-server with `up`'s authorization and the `test` user."""

    server: EmbeddedNats
    passwords: dict[str, str]
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return self.server.url

    def credentials(self, role: str) -> tuple[str, str]:
        return role, self.passwords[role]

    def url_for(self, role: str) -> str:
        return self.url.replace("nats://", f"nats://{role}:{self.passwords[role]}@", 1)

    def env(self, role: str) -> dict[str, str]:
        """The environment of a service process of ``role``."""
        return {
            "STREAMBOOT_NATS_URL": self.url,
            "STREAMBOOT_NATS_USER": role,
            "STREAMBOOT_NATS_PASSWORD": self.passwords[role],
        }

    def settings(self, role: str) -> dict[str, str]:
        """``Settings`` fields of an in-process service of ``role``."""
        return {"nats_url": self.url, "nats_user": role, "nats_password": self.passwords[role]}

    def violations(self) -> list[str]:
        """Permission violations the server logged, but those of clients named
        ``violator...`` (tests that break a rule on purpose)."""
        if self.log_path is None or not self.log_path.exists():
            return []
        lines = self.log_path.read_text(errors="replace").splitlines()
        return [line for line in lines if "Violation" in line and ":violator" not in line]

    async def stop(self) -> None:
        """Stop; any permission violation it saw fails the test (a role lacks a right)."""
        await self.server.stop()
        found = self.violations()
        assert not found, "permission violations on the bus:\n" + "\n".join(found)

    async def start(self, log_path: Path) -> None:
        self.log_path = log_path
        await self.server.start(log_path=log_path)


async def start_nats(root: Path, log_path: Path, **options: Any) -> BusServer:
    """A nats-server under ``root`` with the roles' users and the `test` user."""
    passwords = {role: secrets.token_urlsafe(16) for role in (*ROLES, TEST_ROLE)}
    users = [*role_users(passwords), NatsUser(TEST_ROLE, passwords[TEST_ROLE], TEST_GRANT)]
    nats = BusServer(EmbeddedNats(root, port=free_port(), users=users, **options), passwords)
    await nats.start(log_path)
    return nats


@pytest.fixture(scope="session")
async def nats_server(servers_root: Path) -> AsyncIterator[BusServer]:
    server = await start_nats(servers_root / "nats", servers_root / "nats.log")
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture(autouse=True)
def no_bus_violations(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test on the session's nats-server fails if a permission violation was logged
    while it ran: some role lacks a right it uses (shared/bus_access.py)."""
    if not {"nats_server", "nats_url"} & set(request.fixturenames):
        yield
        return
    server: BusServer = request.getfixturevalue("nats_server")
    before = len(server.violations())
    yield
    found = server.violations()[before:]
    assert not found, "permission violations on the bus:\n" + "\n".join(found)


@pytest.fixture(scope="session")
def nats_url(nats_server: BusServer) -> str:
    return nats_server.url_for(TEST_ROLE)


@pytest.fixture(scope="session")
async def postgres_dsn(servers_root: Path) -> AsyncIterator[str]:
    server = EmbeddedPostgres(
        servers_root,
        port=free_port(),
        password=secrets.token_urlsafe(16),
        user=Settings().postgres_user,
        fast=True,
    )
    await server.start(log_path=servers_root / "postgres.log")
    try:
        yield server.dsn("postgres")
    finally:
        await server.stop()


_database_numbers = itertools.count(1)


@pytest.fixture
async def database_url(postgres_dsn: str) -> AsyncIterator[str]:
    name = f"test_{next(_database_numbers)}"
    admin = await asyncpg.connect(postgres_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield postgres_dsn.rsplit("/", 1)[0] + "/" + name
    admin = await asyncpg.connect(postgres_dsn)
    try:
        # FORCE: a test that leaked a connection must not break the next ones.
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture(scope="session")
def demo_image() -> Path:
    """The demo vdisk (streamboot.demo), built once per machine and reused read-only.

    The kernel package download is cached beside it; tests copy the image if they need
    their own."""
    from streamboot.demo.image import build_demo_image, recipe_digest

    cache = Path(
        os.environ.get("STREAMBOOT_TEST_CACHE", Path.home() / ".cache" / "streamboot-test")
    )
    image = cache / f"demo-{recipe_digest()}.img"
    if not image.exists():
        build_demo_image(image, cache_dir=cache / "kernel")
    image.chmod(0o444)
    return image
