"""An embedded PostgreSQL under a data folder, as root or as a normal user.

Binaries: `STREAMBOOT_POSTGRES_BIN_DIR`, else the machine's own (/usr/lib/postgresql/*/bin,
newest first), else the ones bundled in the `pgserver` wheel. An existing data folder picks
the binaries whose major version matches its PG_VERSION, and never gets touched by others.

Postgres refuses to run as root. Under root we do not let pgserver create users or change
modes: initdb/postgres are exec'ed as an unprivileged user (`STREAMBOOT_POSTGRES_USER`,
default `nobody`), only the postgres folder is chown'ed, and the streamboot data dir is
made traversable (o+x) so that user can reach it.

Authentication: the `streamboot` superuser has a password, checked with scram-sha-256 on
the local socket and on loopback TCP alike (pg_hba.conf), never trust. A data folder whose
pg_hba.conf still trusts (made by an older streamboot), or whose password was just made
anew (rotation: its secret file was deleted), has its password set at start: postgres is
started once with TCP off and only its own socket (inside the 0700 PGDATA) trusted, the
password is set, pg_hba.conf gets scram-sha-256, and postgres is started as usual.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import signal
import stat
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from shared.private_file import replace_private
from shared.settings import url_with_password
from streamboot.embedded.proc import ManagedProcess, RunAs, StartupError, spawn

SUPERUSER = "streamboot"
# pg_hba.conf: the password for every connection (local socket and loopback TCP).
PG_HBA_SCRAM = """\
# streamboot: every connection proves the superuser's password (scram-sha-256).
local   all             all                             scram-sha-256
host    all             all             127.0.0.1/32    scram-sha-256
host    all             all             ::1/128         scram-sha-256
local   replication     all                             scram-sha-256
host    replication     all             127.0.0.1/32    scram-sha-256
host    replication     all             ::1/128         scram-sha-256
"""
# While the password is being set: only the socket in PGDATA, which only the postgres
# OS user (and root) can reach.
PG_HBA_SETTING_PASSWORD = """\
# streamboot: setting the superuser's password; TCP is off meanwhile.
local   all             all                             trust
"""
_UNIX_SOCKET_PATH_MAX = 107  # sun_path is 108 bytes including the NUL


@dataclass(frozen=True)
class PgBinaries:
    bin_dir: Path
    major: int

    def __call__(self, name: str) -> Path:
        return self.bin_dir / name


def _major_of(bin_dir: Path) -> int | None:
    postgres = bin_dir / "postgres"
    if not os.access(postgres, os.X_OK):
        return None
    try:
        out = subprocess.run(
            [postgres, "--version"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"\(PostgreSQL\)\s+(\d+)", out)
    return int(match.group(1)) if match else None


def candidate_bin_dirs(explicit: Path | None = None) -> list[Path]:
    if explicit is not None:
        return [explicit]
    system = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    bundled: list[Path] = []
    spec = importlib.util.find_spec("pgserver")
    if spec is not None and spec.origin is not None:
        bundled.append(Path(spec.origin).parent / "pginstall" / "bin")
    return [*system, *bundled]


def select_binaries(pgdata: Path, explicit: Path | None = None) -> PgBinaries:
    """The binaries for `pgdata`: matching its PG_VERSION when it exists, else the first found."""
    found = [PgBinaries(d, major) for d in candidate_bin_dirs(explicit) if (major := _major_of(d))]
    if not found:
        where = explicit or "/usr/lib/postgresql/*/bin or the pgserver wheel"
        raise StartupError(
            f"no PostgreSQL binaries found in {where}; install `pgserver` (uv sync) or "
            "set STREAMBOOT_DATABASE_URL to an external server"
        )
    wanted = data_major(pgdata)
    if wanted is None:
        return found[0]
    for binaries in found:
        if binaries.major == wanted:
            return binaries
    have = ", ".join(f"{b.major} ({b.bin_dir})" for b in found)
    raise StartupError(
        f"{pgdata} holds a PostgreSQL {wanted} database, but the binaries found are "
        f"PostgreSQL {have}. Nothing was changed. Install PostgreSQL {wanted} and/or set "
        "STREAMBOOT_POSTGRES_BIN_DIR to its bin folder, or use another --data-dir."
    )


def data_major(pgdata: Path) -> int | None:
    """The major version in `pgdata`/PG_VERSION; None for a missing or empty folder."""
    version_file = pgdata / "PG_VERSION"
    if not version_file.exists():
        if pgdata.exists() and any(pgdata.iterdir()):
            raise StartupError(
                f"{pgdata} is not empty but has no PG_VERSION: not a PostgreSQL data folder "
                "(corrupt or foreign). Nothing was changed; move it away or use another --data-dir."
            )
        return None
    text = version_file.read_text().strip()
    if not text.isdigit():
        raise StartupError(f"{version_file} is corrupt ({text[:20]!r}); nothing was changed")
    return int(text)


def run_as_for_root(user: str) -> RunAs | None:
    """Who runs postgres: an unprivileged user when we are root, else ourselves (None)."""
    return RunAs.lookup(user) if os.geteuid() == 0 else None


def check_traversable(run_as: RunAs, paths: list[Path]) -> None:
    """Fail clearly when `run_as` cannot reach `paths` (a 0700 parent folder, typically)."""
    # Ask the kernel as that user (covers ACLs too), one fork for all paths.
    script = 'for p; do [ -x "$p" ] || { printf %s "$p"; exit 1; }; done'
    dirs = sorted(
        {a for p in paths for a in [p, *p.parents] if a.exists()}, key=lambda a: len(a.parts)
    )
    result = subprocess.run(
        ["/bin/sh", "-c", script, "sh", *map(str, dirs)],
        capture_output=True,
        text=True,
        timeout=10,
        preexec_fn=lambda: (os.setgroups([]), os.setgid(run_as.gid), os.setuid(run_as.uid)),
    )
    if result.returncode != 0:
        bad = Path(result.stdout)
        st = bad.stat()
        raise StartupError(
            f"PostgreSQL runs as user {run_as.name!r} (postgres refuses to run as root), and "
            f"{run_as.name!r} cannot traverse {bad} (mode {stat.filemode(st.st_mode)}, "
            f"owner uid {st.st_uid}). Use a data dir whose parent folders are traversable "
            f"(e.g. under /var/lib or /tmp), run `chmod o+x {bad}`, or set "
            "STREAMBOOT_POSTGRES_USER to a user that can."
        )


@dataclass
class EmbeddedPostgres:
    """PostgreSQL on loopback with its data in `data_dir`/postgres; the `streamboot`
    superuser logs in with `password` (scram-sha-256)."""

    data_dir: Path
    port: int
    password: str = field(repr=False)
    host: str = "127.0.0.1"
    database: str = "streamboot"
    user: str = "nobody"  # the OS user under root
    bin_dir: Path | None = None
    fast: bool = False  # tests: no fsync; a crash may lose data
    process: ManagedProcess | None = None
    binaries: PgBinaries | None = field(default=None, init=False)

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "postgres"

    def dsn(self, database: str | None = None) -> str:
        """The DSN to connect with, password included: never print or log it."""
        return url_with_password(self.url_of(database), self.password)

    def url_of(self, database: str | None = None) -> str:
        """The DSN without the password: what may be shown."""
        return f"postgresql://{SUPERUSER}@{self.host}:{self.port}/{database or self.database}"

    @property
    def url(self) -> str:
        return self.url_of()

    def prepare(self) -> RunAs | None:
        """Check everything before any change: binaries, versions, ownership, reachability."""
        self.binaries = select_binaries(self.pgdata, self.bin_dir)
        run_as = run_as_for_root(self.user)
        owner_uid = run_as.uid if run_as else os.geteuid()
        if self.pgdata.exists() and self.pgdata.stat().st_uid != owner_uid:
            raise StartupError(
                f"{self.pgdata} belongs to uid {self.pgdata.stat().st_uid}, but PostgreSQL "
                f"would run as uid {owner_uid}. Nothing was changed; set "
                "STREAMBOOT_POSTGRES_USER (when root) or run as the folder's owner."
            )
        if run_as is not None:
            # The data dir itself must be traversable; the folders above it we only check.
            mode = self.data_dir.stat().st_mode
            if not mode & stat.S_IXOTH:
                os.chmod(self.data_dir, stat.S_IMODE(mode) | 0o711)
            check_traversable(run_as, [self.data_dir, self.binaries.bin_dir])
        return run_as

    async def start(
        self, log_path: Path, wait_s: float = 60.0, *, new_password: bool = False
    ) -> None:
        """Start (initialising a new data folder); ``new_password``: the password was just
        generated, so an existing folder gets it set (see the module's docstring)."""
        run_as = self.prepare()
        assert self.binaries is not None
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC"}
        if not (self.pgdata / "PG_VERSION").exists():
            self.pgdata.mkdir(mode=0o700, exist_ok=True)
            if run_as is not None:
                os.chown(self.pgdata, run_as.uid, run_as.gid)
            await self._initdb(run_as, env, log_path)
        elif new_password or trusts(self.pgdata / "pg_hba.conf"):
            await self._set_password(run_as, env, log_path, wait_s)
        await self._run(run_as, env, log_path, wait_s)
        await self.ensure_database(self.database)

    @property
    def socket_dir(self) -> str:
        socket_dir = str(self.pgdata)
        if len(f"{socket_dir}/.s.PGSQL.{self.port}") > _UNIX_SOCKET_PATH_MAX:
            return ""  # path too long for a unix socket: TCP only
        return socket_dir

    async def _set_password(
        self, run_as: RunAs | None, env: dict[str, str], log_path: Path, wait_s: float
    ) -> None:
        """Give the superuser ``password`` and make pg_hba.conf ask for it."""
        if not self.socket_dir:
            raise StartupError(
                f"the PostgreSQL password of {self.pgdata} must be set, which needs its unix "
                f"socket, but the path is too long for one ({_UNIX_SOCKET_PATH_MAX} bytes). "
                "Nothing was changed; move the data dir to a shorter path once."
            )
        hba = self.pgdata / "pg_hba.conf"
        _rewrite(hba, PG_HBA_SETTING_PASSWORD)
        await self._run(run_as, env, log_path, wait_s, tcp=False)
        try:
            conn = await asyncpg.connect(
                host=self.socket_dir, port=self.port, user=SUPERUSER, database="postgres"
            )
            try:
                await conn.execute("SET password_encryption = 'scram-sha-256'")
                # ALTER ROLE takes no parameters: the password is quoted as a literal.
                literal = await conn.fetchval("SELECT quote_literal($1::text)", self.password)
                await conn.execute(f"ALTER ROLE {SUPERUSER} PASSWORD {literal}")
            finally:
                await conn.close()
        finally:
            await self.stop()
        _rewrite(hba, PG_HBA_SCRAM)

    async def _run(
        self,
        run_as: RunAs | None,
        env: dict[str, str],
        log_path: Path,
        wait_s: float,
        tcp: bool = True,
    ) -> None:
        assert self.binaries is not None
        argv: list[str | os.PathLike[str]] = [
            self.binaries("postgres"),
            "-D", self.pgdata,
            "-p", str(self.port),
            "-c", f"listen_addresses={self.host if tcp else ''}",
            "-c", f"unix_socket_directories={self.socket_dir}",
            # The event log's indexes must stay in memory as it grows to millions of
            # events, or every append waits on random reads of index pages.
            "-c", "shared_buffers=512MB",
            "-c", "max_wal_size=4GB",
            "-c", "wal_compression=on",
            # The WAL writer flushes a batch's WAL while the batch is still being written,
            # so its commit waits on less (measured: 1.8 -> 1.4 ms per commit of 1,000
            # events). Commits still wait for their WAL to be on disk.
            "-c", "wal_writer_delay=10ms",
        ]  # fmt: skip
        if self.fast:
            argv += ["-c", "fsync=off", "-c", "synchronous_commit=off"]
            argv += ["-c", "full_page_writes=off"]
        self.process = await spawn(
            "postgres",
            argv,
            env=env,
            cwd=self.pgdata,
            log_path=log_path,
            stop_signal=signal.SIGINT,  # "fast" shutdown: clean, without waiting for clients
            death_signal=signal.SIGINT,
            run_as=run_as,
        )
        await self._wait_ready(wait_s, tcp)

    async def _initdb(self, run_as: RunAs | None, env: dict[str, str], log_path: Path) -> None:
        assert self.binaries is not None
        # initdb reads the password from a file that the user it runs as can read: beside
        # PGDATA, 0600, theirs, and gone once initdb is done.
        pwfile = self.data_dir / ".postgres-initdb-password"
        replace_private(pwfile, self.password + "\n")
        if run_as is not None:
            os.chown(pwfile, run_as.uid, run_as.gid)
        argv: list[str | os.PathLike[str]] = [
            self.binaries("initdb"),
            "-D", self.pgdata,
            "-U", SUPERUSER,
            f"--pwfile={pwfile}",
            "--auth=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C",
        ]  # fmt: skip
        if self.fast:
            argv.append("--no-sync")
        try:
            proc = await spawn(
                "initdb", argv, env=env, cwd=self.pgdata, log_path=log_path, run_as=run_as
            )
            try:
                returncode = await proc.process.wait()
            except asyncio.CancelledError:
                await proc.stop()  # SIGTERM: initdb removes what it wrote, so a rerun starts clean
                raise
        finally:
            pwfile.unlink(missing_ok=True)
        if returncode != 0:
            raise StartupError(f"initdb failed; last log lines:\n{proc.log_tail()}")

    async def _wait_ready(self, wait_s: float, tcp: bool = True) -> None:
        assert self.process is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            if not self.process.running:
                raise StartupError(
                    f"postgres exited with code {self.process.process.returncode} during "
                    f"startup; last log lines:\n{self.process.log_tail()}"
                )
            try:
                if tcp:
                    conn = await asyncpg.connect(self.dsn("postgres"), timeout=2)
                else:
                    conn = await asyncpg.connect(
                        host=self.socket_dir, port=self.port, user=SUPERUSER,
                        database="postgres", timeout=2,
                    )  # fmt: skip
            except (OSError, asyncpg.PostgresError, TimeoutError):
                if loop.time() > deadline:
                    raise StartupError(
                        f"postgres did not accept connections on {self.host}:{self.port} "
                        f"within {wait_s:.0f}s; last log lines:\n{self.process.log_tail()}"
                    ) from None
                await asyncio.sleep(0.05)
                continue
            await conn.close()
            return

    async def ensure_database(self, name: str) -> None:
        conn = await asyncpg.connect(self.dsn("postgres"))
        try:
            if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
                await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    async def stop(self) -> None:
        if self.process is not None:
            await self.process.stop(grace_s=30)


def trusts(hba: Path) -> bool:
    """Whether pg_hba.conf lets any connection in without a password (``trust``)."""
    for line in hba.read_text().splitlines():
        fields = line.split("#", 1)[0].split()
        if "trust" in fields:
            return True
    return False


def _rewrite(path: Path, text: str) -> None:
    """Replace a file's content in place: its owner (the postgres user) and mode stay."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
