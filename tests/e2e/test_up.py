"""`streamboot up` end to end: a real subprocess, a temp data dir, free ports.

Checks: it starts NATS + PostgreSQL (+ whichever services exist), stops cleanly on SIGTERM
with no process left behind, starts a service that dies again (and stops everything on a
crash loop), keeps data across restarts, leaves no orphans when killed -9,
refuses a second `up` on the same dir, and refuses foreign or corrupt data dirs untouched.

`status`, `events list` and the CLI verbs against a running `up` are in test_system.py, and
so is NATS or PostgreSQL dying under it (started again; the system still answers).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import nats
import psutil
import pytest

from services.boot import boot_trace
from shared import bus
from shared.bus import key_value_bucket
from shared.bus_access import ROLES
from shared.heartbeat import read_heartbeats
from shared.settings import Settings, url_with_password, without_password
from streamboot.runtime import NotRunningError, api_client, load_runtime
from streamboot.supervisor import PORT_FIELDS, SERVICES
from tests.conftest import BusServer

STREAMBOOT = Path(sys.executable).parent / "streamboot"
# The four services are written in parallel with this test: start those that exist.
AVAILABLE = [s for s in SERVICES if importlib.util.find_spec(f"services.{s}.__main__")]
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 90.0


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


class Up:
    """One `streamboot up` subprocess with its output in a file beside the data dir."""

    def __init__(self, data_dir: Path, services: list[str], **env: str) -> None:
        self.data_dir = data_dir
        self.log = data_dir.parent / f"up-{time.monotonic_ns()}.log"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMBOOT_")}
        full_env.update({f"STREAMBOOT_{f.upper()}": "0" for f in PORT_FIELDS}, **env)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [STREAMBOOT, "up", "--data-dir", data_dir, "--services", ",".join(services)],
                env=full_env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    @property
    def output(self) -> str:
        return self.log.read_text()

    def wait_running(self) -> dict[str, Any]:
        runtime = self.data_dir / "runtime.json"
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert self.proc.poll() is None, f"up exited early:\n{self.output}"
            assert time.monotonic() < deadline, f"up did not start:\n{self.output}"
            if (
                runtime.exists()
                and (info := json.loads(runtime.read_text()))["pid"] == self.proc.pid
            ):
                return info
            time.sleep(0.1)

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def stop(self) -> int:
        """Stop it; any permission violation its NATS logged fails the test (a service
        lacks a right it uses: shared/bus_access.py)."""
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=STOP_TIMEOUT_S)
        nats_log = self.data_dir / "logs" / "nats.log"
        if nats_log.exists():
            found = [line for line in nats_log.read_text().splitlines() if "Violation" in line]
            assert not found, "permission violations on the bus:\n" + "\n".join(found)
        return code

    def wait_exit(self) -> int:
        return self.proc.wait(timeout=START_TIMEOUT_S)


def assert_all_gone(processes: list[psutil.Process]) -> None:
    # psutil checks creation times too, so a reused pid does not count as alive.
    _, alive = psutil.wait_procs(processes, timeout=STOP_TIMEOUT_S)
    assert not alive, f"left behind: {[(p.pid, p.cmdline()) for p in alive]}"


def database_url(data_dir: Path) -> str:
    """What the CLI connects with: runtime.json's URL and the password in DIR/secrets."""
    return Settings(data_dir=data_dir).require_database_url()


async def connect_as(data_dir: Path, role: str) -> nats.NATS:
    """A NATS connection as ``role``, with the password `up` made for it."""
    settings = Settings(data_dir=data_dir)
    return await bus.connect(
        settings.require_nats_url(), f"e2e-{role}", credentials=settings.nats_credentials(role)
    )


async def write_marks(data_dir: Path) -> None:
    conn = await asyncpg.connect(database_url(data_dir))
    await conn.execute("CREATE TABLE e2e_mark (v text); INSERT INTO e2e_mark VALUES ('run 1')")
    await conn.close()
    # JetStream on disk: a key in a bucket of the boot role's own.
    nc = await connect_as(data_dir, "boot")
    kv = await key_value_bucket(nc.jetstream(), boot_trace.BUCKET, boot_trace.TTL_S)
    await kv.put("e2e-mark", b"event from run 1")
    await nc.close()


async def read_marks(data_dir: Path) -> tuple[str, bytes]:
    conn = await asyncpg.connect(database_url(data_dir))
    row = await conn.fetchval("SELECT v FROM e2e_mark")
    await conn.close()
    nc = await connect_as(data_dir, "boot")
    entry = await (await nc.jetstream().key_value(boot_trace.BUCKET)).get("e2e-mark")
    await nc.close()
    return row, entry.value or b""


async def refused(url: str) -> str:
    """The error a login with what ``url`` carries (nothing else) gets."""
    with pytest.raises(Exception) as failed:
        conn = await asyncpg.connect(url)
        await conn.close()
    return str(failed.value)


def assert_secrets_private(data_dir: Path) -> None:
    """Every password `up` made (and the NATS config holding them) is its owner's only."""
    secrets = data_dir / "secrets"
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o700
    files = sorted(p.name for p in secrets.iterdir())
    assert files == sorted(["postgres", *(f"nats-{r}" for r in ROLES)])
    for path in [*secrets.iterdir(), data_dir / "nats" / "nats-server.conf"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_up_stops_cleanly_and_keeps_data_across_restarts(data_dir: Path) -> None:
    first = Up(data_dir, AVAILABLE)
    info = first.wait_running()
    assert {"nats_url", "database_url", "api_url", "endpoints"} <= info.keys()
    assert info["nats_url"] in first.output and info["database_url"] in first.output
    # No password is shown or written where others may read it; without it: refused.
    assert_secrets_private(data_dir)
    pg_password = (data_dir / "secrets" / "postgres").read_text().strip()
    runtime_text = (data_dir / "runtime.json").read_text()
    assert pg_password not in first.output and pg_password not in runtime_text
    assert "password" in run(refused(info["database_url"]))
    with pytest.raises(bus.BusError, match="refused the login"):
        run(bus.connect(info["nats_url"], "e2e-anonymous", connect_timeout_s=5))
    assert info["endpoints"]["iscsi"] in first.output  # the stream node's iSCSI portal
    token_file = data_dir / "api-token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_file.read_text()
    assert load_runtime(data_dir) == info
    with api_client(data_dir) as client:
        assert str(client.base_url).rstrip("/") == info["api_url"]
        assert client.headers["Authorization"] == f"Bearer {token.strip()}"
    run(write_marks(data_dir))

    children = first.descendants()
    names = {p.name() for p in children}
    assert "nats-server" in names and "postgres" in names, names
    assert first.stop() == 0, first.output
    assert_all_gone(children)
    assert not (data_dir / "runtime.json").exists()
    with pytest.raises(NotRunningError, match="not running"):
        load_runtime(data_dir)

    # Rotation: deleted secrets are made anew at the next `up`, and used.
    secrets = data_dir / "secrets"
    old = {name: (secrets / name).read_text() for name in ("postgres", "nats-boot")}
    for name in old:
        (secrets / name).unlink()

    second = Up(data_dir, AVAILABLE)
    info = second.wait_running()
    try:
        assert token_file.read_text() == token
        assert all((secrets / name).read_text() != text for name, text in old.items())
        assert_secrets_private(data_dir)
        assert run(read_marks(data_dir)) == (
            "run 1",
            b"event from run 1",
        )
        old_dsn = url_with_password(info["database_url"], old["postgres"].strip())
        assert "password authentication failed" in run(refused(old_dsn))

        # A concurrent `up` on the same dir is refused and does not disturb the first.
        third = Up(data_dir, AVAILABLE)
        assert third.wait_exit() == 2
        assert "in use by another `streamboot up`" in third.output
        assert second.proc.poll() is None
        assert (data_dir / "runtime.json").exists()
    finally:
        children = second.descendants()
        assert second.stop() == 0, second.output
    assert_all_gone(children)


def test_up_killed_hard_leaves_no_orphans(data_dir: Path) -> None:
    up = Up(data_dir, AVAILABLE)
    up.wait_running()
    children = up.descendants()
    assert children
    up.proc.send_signal(signal.SIGKILL)
    up.proc.wait(timeout=STOP_TIMEOUT_S)
    assert_all_gone(children)  # parent-death signal
    with pytest.raises(NotRunningError, match="stale"):
        load_runtime(data_dir)

    again = Up(data_dir, AVAILABLE)  # the stale runtime.json and lock do not block a restart
    again.wait_running()
    assert again.stop() == 0, again.output


@pytest.mark.parametrize("given_in", ["settings", "url"])
def test_up_with_external_servers_starts_neither(
    data_dir: Path, nats_server: BusServer, database_url: str, given_in: str
) -> None:
    """An external NATS with credentials given in the settings or in its URL (one user for
    every process: here the tests' `test` user) and an external PostgreSQL with a
    password."""
    user, password = nats_server.credentials("test")
    external = {"STREAMBOOT_DATABASE_URL": database_url}
    if given_in == "settings":
        external |= {
            "STREAMBOOT_NATS_URL": nats_server.url,
            "STREAMBOOT_NATS_USER": user,
            "STREAMBOOT_NATS_PASSWORD": password,
        }
    else:
        external["STREAMBOOT_NATS_URL"] = nats_server.url_for("test")
    up = Up(data_dir, AVAILABLE, **external)
    info = up.wait_running()
    try:
        # Shown and kept without the passwords.
        prefix = f"nats://{user}@" if given_in == "url" else "nats://"
        assert info["nats_url"] == nats_server.url.replace("nats://", prefix)
        assert info["database_url"] == without_password(database_url) != database_url
        assert password not in up.output and urlsplit(database_url).password not in up.output
        names = {p.name() for p in up.descendants()}
        assert not names & {"nats-server", "postgres"}, names
    finally:
        assert up.stop() == 0, up.output
    assert not (data_dir / "postgres").exists()


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"streamboot.json": '{"format": 999}'}, "has data format 999"),
        ({"streamboot.json": "{not json"}, "streamboot.json is corrupt"),
        ({"notes.txt": "someone else's folder"}, "not a streamboot data dir"),
        (
            {"streamboot.json": '{"format": 1}', "postgres/PG_VERSION": "9\n"},
            "holds a PostgreSQL 9 database",
        ),
        (
            {"streamboot.json": '{"format": 1}', "postgres/base": "garbage"},
            "not a PostgreSQL data folder",
        ),
    ],
    ids=["newer-format", "corrupt-marker", "foreign-folder", "other-pg-major", "corrupt-pgdata"],
)
def test_up_refuses_foreign_or_corrupt_data_dirs(
    data_dir: Path, files: dict[str, str], message: str
) -> None:
    for name, text in files.items():
        (data_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (data_dir / name).write_text(text)
    before = _tree(data_dir)

    up = Up(data_dir, AVAILABLE)
    assert up.wait_exit() == 2
    assert message in up.output
    after = _tree(data_dir)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing overwritten
    assert not (data_dir / "runtime.json").exists()


def test_up_refuses_a_missing_service_module(data_dir: Path) -> None:
    missing = [s for s in SERVICES if s not in AVAILABLE]
    if not missing:
        pytest.skip("all four services exist")
    up = Up(data_dir, [missing[0]])
    assert up.wait_exit() == 2
    assert f"service {missing[0]} is missing" in up.output
    assert not data_dir.exists()  # refused before touching anything


def test_up_refuses_a_port_in_use(data_dir: Path) -> None:
    with socket.socket() as other_server:
        other_server.bind(("127.0.0.1", 0))
        other_server.listen()
        port = other_server.getsockname()[1]
        up = Up(data_dir, AVAILABLE, STREAMBOOT_POSTGRES_PORT=str(port))
        assert up.wait_exit() == 2
    assert f"TCP port 127.0.0.1:{port} (postgres_port) is already in use" in up.output
    assert not data_dir.exists()  # a new data dir: refused before any file is made


def service_process(up: Up, name: str) -> psutil.Process | None:
    def is_it(p: psutil.Process) -> bool:
        try:
            return f"services.{name}" in p.cmdline()
        except (psutil.Error, OSError):  # gone meanwhile (the one just killed)
            return False

    return next((p for p in up.descendants() if is_it(p)), None)


def wait_started_again(up: Up, name: str, old_pid: int) -> psutil.Process:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        assert up.proc.poll() is None, f"up exited:\n{up.output}"
        assert time.monotonic() < deadline, f"{name} not started again:\n{up.output}"
        again = service_process(up, name)
        runtime = json.loads((up.data_dir / "runtime.json").read_text())
        if again is not None and again.pid != old_pid and runtime["services"][name] == again.pid:
            return again
        time.sleep(0.1)


@pytest.mark.skipif("cache" not in AVAILABLE, reason="no cache service")
def test_up_starts_a_service_that_dies_again_and_stops_on_a_crash_loop(data_dir: Path) -> None:
    up = Up(data_dir, AVAILABLE)
    up.wait_running()
    first = service_process(up, "cache")
    assert first is not None
    first.kill()
    again = wait_started_again(up, "cache", first.pid)
    assert f"service cache exited with code {-signal.SIGKILL}" in up.output
    assert f"service cache started again (pid {again.pid}; 1 exit within 60 s" in up.output
    # It works: it is back on the bus, as its own NATS user (its heartbeat, read as the
    # CLI reads it).

    async def heartbeat() -> dict[str, Any]:
        nc = await connect_as(data_dir, "cli")
        try:
            for _ in range(100):
                beats = await read_heartbeats(nc.jetstream(), 10)
                for beat in beats:
                    if beat["service"] == "cache" and beat.get("pid") == again.pid:
                        return beat
                await asyncio.sleep(0.2)
            raise AssertionError(f"the cache service started again never answered:\n{up.output}")
        finally:
            await nc.close()

    assert run(heartbeat())["alive"]
    # Killed again and again: a crash loop stops everything, and says so.
    for _ in range(3):
        victim = again
        victim.kill()
        again = wait_started_again(up, "cache", victim.pid)
    children = up.descendants()
    again.kill()
    assert up.wait_exit() == 1
    assert "service cache exited 5 times within 60 s; not starting it again" in up.output
    assert_all_gone(children)
    assert not (data_dir / "runtime.json").exists()


def test_up_stopped_while_postgres_starts_again_stops_cleanly(data_dir: Path) -> None:
    up = Up(data_dir, AVAILABLE)
    up.wait_running()
    children = up.descendants()
    [postgres] = [p for p in psutil.Process(up.proc.pid).children() if p.name() == "postgres"]
    postgres.kill()
    deadline = time.monotonic() + START_TIMEOUT_S
    while "postgres exited" not in up.output:
        assert time.monotonic() < deadline, up.output
        time.sleep(0.05)
    # Whether the stop lands during the restart or after it, everything stops, cleanly.
    assert up.stop() == 0, up.output
    assert_all_gone(children)
    # Nor is the PostgreSQL started again (if it was) left behind.

    def of_this_dir() -> list[psutil.Process]:
        found = []
        for p in psutil.process_iter(["cmdline"]):
            if str(data_dir) in " ".join(p.info["cmdline"] or []):
                found.append(p)
        return found

    assert_all_gone(of_this_dir())
    assert not (data_dir / "runtime.json").exists()
