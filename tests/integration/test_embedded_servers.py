"""The embedded nats-server and PostgreSQL used by `streamboot up` and the test fixtures."""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import nats
import pytest

from streamboot.embedded.nats import EmbeddedNats
from streamboot.embedded.postgres import (
    EmbeddedPostgres,
    _major_of,
    _rewrite,
    candidate_bin_dirs,
    trusts,
)
from streamboot.embedded.proc import StartupError, free_port
from tests.conftest import traversable_tmpdir

BIN_DIRS = [d for d in candidate_bin_dirs() if _major_of(d)]
PASSWORD = "test-password-" + "p" * 16
# What pg_hba.conf said before the embedded PostgreSQL had a password (initdb --auth=trust).
OLD_TRUST_HBA = """\
local   all             all                                     trust
host    all             all             127.0.0.1/32            trust
host    all             all             ::1/128                 trust
"""


@pytest.fixture
def data_dir() -> Iterator[Path]:
    path = traversable_tmpdir("streamboot-test-pg-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def test_nats_fixture_has_jetstream_and_8mb_payloads(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        assert nc.max_payload == 8 * 1024 * 1024
        js = nc.jetstream()
        await js.add_stream(name="FIXTURE_CHECK", subjects=["fixture.check"])
        big = os.urandom(4 * 1024 * 1024)  # above the 1 MB NATS default
        ack = await js.publish("fixture.check", big)
        msg = await js.get_msg("FIXTURE_CHECK", ack.seq)
        assert msg.data == big
    finally:
        await nc.close()


async def test_nats_listens_only_where_it_is_told(data_dir: Path) -> None:
    """STREAMBOOT_NATS_LISTEN_HOST's server: reachable on that address (another loopback
    one here, so the test exposes nothing), not on 127.0.0.1; its URL names the address."""
    server = EmbeddedNats(data_dir / "nats", port=free_port("127.0.0.2"), host="127.0.0.2")
    await server.start(log_path=data_dir / "nats.log")
    try:
        assert server.url == f"nats://127.0.0.2:{server.port}"
        nc = await nats.connect(server.url)
        await nc.close()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", server.port), timeout=5).close()
    finally:
        await server.stop()
    # Listening on every address, this machine's own clients still use loopback.
    assert EmbeddedNats(data_dir, port=1, host="0.0.0.0").url == "nats://127.0.0.1:1"


@pytest.mark.parametrize("run", [1, 2])
async def test_database_url_is_a_fresh_database_per_test(database_url: str, run: int) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        assert (await conn.fetchval("SELECT current_database()")).startswith("test_")
        # Same table in both runs: only works if each test has its own empty database.
        assert await conn.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname='public'") == 0
        await conn.execute("CREATE TABLE marker (run int)")
    finally:
        await conn.close()


@pytest.mark.parametrize("bin_dir", BIN_DIRS, ids=str)
async def test_postgres_keeps_data_across_restarts(data_dir: Path, bin_dir: Path) -> None:
    server = EmbeddedPostgres(
        data_dir, port=free_port(), password=PASSWORD, bin_dir=bin_dir, fast=True
    )
    await server.start(log_path=data_dir / "pg.log")
    try:
        conn = await asyncpg.connect(server.dsn())
        version = await conn.fetchval("SHOW server_version_num")
        await conn.execute("CREATE TABLE kept (v text); INSERT INTO kept VALUES ('hello')")
        await conn.close()
    finally:
        await server.stop()
    assert int(version) // 10000 == _major_of(bin_dir)

    again = EmbeddedPostgres(
        data_dir, port=free_port(), password=PASSWORD, bin_dir=bin_dir, fast=True
    )
    await again.start(log_path=data_dir / "pg.log")
    try:
        conn = await asyncpg.connect(again.dsn())
        assert await conn.fetchval("SELECT v FROM kept") == "hello"
        await conn.close()
    finally:
        await again.stop()


async def test_postgres_refuses_data_of_another_major_version(data_dir: Path) -> None:
    majors = {_major_of(d): d for d in BIN_DIRS}
    if len(majors) < 2:
        pytest.skip("needs two PostgreSQL major versions (system + pgserver)")
    (old_major, old_dir), (_, new_dir) = sorted(majors.items())[:2]
    server = EmbeddedPostgres(
        data_dir, port=free_port(), password=PASSWORD, bin_dir=old_dir, fast=True
    )
    await server.start(log_path=data_dir / "pg.log")
    await server.stop()

    other = EmbeddedPostgres(
        data_dir, port=free_port(), password=PASSWORD, bin_dir=new_dir, fast=True
    )
    with pytest.raises(StartupError, match=f"holds a PostgreSQL {old_major} database"):
        await other.start(log_path=data_dir / "pg.log")
    assert (data_dir / "postgres" / "PG_VERSION").read_text().strip() == str(old_major)
    assert other.process is None  # refused before starting anything


async def test_postgres_refuses_a_foreign_folder(data_dir: Path) -> None:
    (data_dir / "postgres").mkdir()
    (data_dir / "postgres" / "precious.txt").write_text("not a database")
    server = EmbeddedPostgres(data_dir, port=free_port(), password=PASSWORD)
    with pytest.raises(StartupError, match="not a PostgreSQL data folder"):
        await server.start(log_path=data_dir / "pg.log")
    assert sorted(p.name for p in (data_dir / "postgres").iterdir()) == ["precious.txt"]


@pytest.mark.skipif(os.geteuid() != 0, reason="the unprivileged postgres user exists under root")
async def test_root_gets_a_clear_error_for_an_untraversable_parent(data_dir: Path) -> None:
    os.chmod(data_dir, 0o755)
    hidden = data_dir / "private"
    hidden.mkdir(mode=0o700)
    (hidden / "dd").mkdir()
    server = EmbeddedPostgres(hidden / "dd", port=free_port(), password=PASSWORD)
    with pytest.raises(StartupError, match=f"cannot traverse {hidden} "):
        await server.start(log_path=data_dir / "pg.log")
    assert not (hidden / "dd" / "postgres").exists()


async def refused_without(server: EmbeddedPostgres, password: str | None) -> str:
    """The error PostgreSQL answers a login with ``password`` (None: none) on loopback."""
    dsn = server.url_of("postgres")
    with pytest.raises(asyncpg.PostgresError) as refused:
        conn = await asyncpg.connect(dsn, password=password)
        await conn.close()  # not reached when refused
    return str(refused.value)


async def test_postgres_refuses_a_login_without_its_password(data_dir: Path) -> None:
    server = EmbeddedPostgres(data_dir, port=free_port(), password=PASSWORD, fast=True)
    await server.start(log_path=data_dir / "pg.log")
    try:
        assert "password" in await refused_without(server, None)
        assert "password authentication failed" in await refused_without(server, "guess")
        conn = await asyncpg.connect(server.dsn())
        assert await conn.fetchval("SELECT 1") == 1
        await conn.close()
        assert not trusts(server.pgdata / "pg_hba.conf")
        # The password is never shown: only the DSN used to connect carries it.
        assert PASSWORD not in server.url and PASSWORD not in repr(server)
    finally:
        await server.stop()
    assert not (data_dir / ".postgres-initdb-password").exists()


async def test_a_trust_data_dir_gets_a_password_and_keeps_its_data(data_dir: Path) -> None:
    """A data dir of a streamboot that trusted every loopback login (no password set) is
    upgraded at the next start: password set, pg_hba.conf scram-sha-256, data kept."""
    old = EmbeddedPostgres(data_dir, port=free_port(), password=PASSWORD, fast=True)
    await old.start(log_path=data_dir / "pg.log")
    try:
        conn = await asyncpg.connect(old.dsn())
        await conn.execute("CREATE TABLE kept (v text); INSERT INTO kept VALUES ('before')")
        await conn.execute("ALTER ROLE streamboot PASSWORD NULL")
        await conn.close()
    finally:
        await old.stop()
    _rewrite(old.pgdata / "pg_hba.conf", OLD_TRUST_HBA)
    assert trusts(old.pgdata / "pg_hba.conf")

    upgraded = EmbeddedPostgres(data_dir, port=free_port(), password="new-" + PASSWORD, fast=True)
    await upgraded.start(log_path=data_dir / "pg.log")
    try:
        assert not trusts(upgraded.pgdata / "pg_hba.conf")
        assert "password" in await refused_without(upgraded, None)
        conn = await asyncpg.connect(upgraded.dsn())
        assert await conn.fetchval("SELECT v FROM kept") == "before"
        await conn.close()
    finally:
        await upgraded.stop()

    # Rotation: a password made anew (its secret file deleted) replaces the old one.
    rotated = EmbeddedPostgres(data_dir, port=free_port(), password="rotated-pw", fast=True)
    await rotated.start(log_path=data_dir / "pg.log", new_password=True)
    try:
        assert "password authentication failed" in await refused_without(rotated, "new-" + PASSWORD)
        conn = await asyncpg.connect(rotated.dsn())
        assert await conn.fetchval("SELECT v FROM kept") == "before"
        await conn.close()
    finally:
        await rotated.stop()
