"""`streamboot up`: NATS, PostgreSQL and the four services on one machine, in the foreground.

Start order: data dir lock → NATS → PostgreSQL → services → runtime.json. Stop order is
the reverse, on SIGINT/SIGTERM. A child that exits on its own (a service, the embedded
NATS or PostgreSQL) is started again, as compose's and Nomad's restart policies do, said on
the output with its exit code; the others ride the gap out (services reconnect to NATS
and PostgreSQL and keep their unsent events; a stream node's sessions wait for a
restarting cache service). One that keeps exiting (RESTART_LIMIT times in
RESTART_WINDOW_S, failed restarts included) stops everything and `up` fails: a crashed
piece is never silently missing.
Children die with the supervisor even on `kill -9` (parent-death signal, see
`embedded.proc`).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence

from shared import bus
from shared.bus_access import role_users
from shared.fd_limit import raise_soft_limit
from shared.heartbeat import read_heartbeats
from shared.settings import (
    API_TOKEN_FILE,
    POSTGRES_PASSWORD_FILE,
    SECRETS_DIR,
    Settings,
    without_password,
)
from streamboot.embedded.datadir import DataDir
from streamboot.embedded.nats import EmbeddedNats
from streamboot.embedded.postgres import EmbeddedPostgres
from streamboot.embedded.proc import (
    ManagedProcess,
    StartupError,
    free_port,
    port_in_use,
    spawn,
    wait_group_gone,
)
from streamboot.services import SERVICES

# Settings fields that are ports, with their protocol. 0 means "pick a free one" and is
# resolved once, here, so every service and runtime.json see the same concrete number.
PORTS: dict[str, str] = {
    "nats_port": "tcp",
    "postgres_port": "tcp",
    "api_port": "tcp",
    "http_stream_port": "tcp",
    "nbd_port": "tcp",
    "iscsi_port": "tcp",
    "boot_http_port": "tcp",
    "tftp_port": "udp",
    "dhcp_port": "udp",
    "dhcp_pxe_port": "udp",
}
# The embedded NATS and PostgreSQL serve this machine's services: loopback, whatever address
# the services listen on for clients (NATS elsewhere only when STREAMBOOT_NATS_LISTEN_HOST
# asks, for stream nodes on other hosts).
EMBEDDED_HOST = "127.0.0.1"
EMBEDDED_PORTS = ("nats_port", "postgres_port")
PORT_FIELDS: tuple[str, ...] = tuple(PORTS)
SERVICE_STOP_TIMEOUT_S = 10.0
# A child exiting this many times within the window is a crash loop: everything stops.
RESTART_LIMIT = 5
RESTART_WINDOW_S = 60.0
# Before the n-th restart within the window: (n - 1) * this (the first one at once).
RESTART_BACKOFF_S = 1.0
# How long a restarted PostgreSQL may take to accept connections (crash recovery).
POSTGRES_RECOVERY_S = 600.0


def service_available(name: str) -> bool:
    """Whether `python -m services.<name>` can run (the module has a __main__)."""
    try:
        return importlib.util.find_spec(f"services.{name}.__main__") is not None
    except ImportError:
        return False


def check_service_modules(names: Sequence[str]) -> None:
    """Fail before starting anything when a service cannot be run with `python -m`."""
    unknown = [n for n in names if n not in SERVICES]
    if unknown:
        raise StartupError(f"unknown service(s) {', '.join(unknown)}; known: {', '.join(SERVICES)}")
    missing = [n for n in names if not service_available(n)]
    if missing:
        present = ",".join(n for n in SERVICES if service_available(n))
        raise StartupError(
            f"service {', '.join(missing)} is missing: no module "
            + ", ".join(f"services.{n}.__main__" for n in missing)
            + " (`python -m` cannot run it). Start only the services that exist with "
            + f"--services '{present}'"
        )


def endpoints(settings: Settings) -> dict[str, str]:
    host = settings.advertised_host
    return {
        "api": f"http://{host}:{settings.api_port}",
        "http_stream": f"http://{host}:{settings.http_stream_port}",
        "nbd": f"nbd://{host}:{settings.nbd_port}",
        "iscsi": f"iscsi://{host}:{settings.iscsi_port}",
        "boot_http": f"http://{host}:{settings.boot_http_port}",
        "tftp": f"tftp://{host}:{settings.tftp_port}",
        "dhcp": f"udp://{host}:{settings.dhcp_port}",
    }


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        services: Sequence[str] = SERVICES,
        out: Callable[[str], None] = lambda line: print(line, flush=True),
    ) -> None:
        self.settings = settings
        self.services = list(services)
        self.out = out
        self.data_dir = DataDir(settings.data_dir)
        self.nats: EmbeddedNats | None = None
        self.postgres: EmbeddedPostgres | None = None
        self.children: list[ManagedProcess] = []
        self._stop = asyncio.Event()
        # What a service is started with, and runtime.json, kept for restarts.
        self._service_env: dict[str, str] = {}
        self._nats_passwords: dict[str, str] = {}
        self._database_url = ""  # with its password: the registry's only
        self._runtime: dict[str, object] = {}
        # When each service last exited on its own, within RESTART_WINDOW_S.
        self._exits: dict[str, list[float]] = {}

    async def run(self) -> int:
        """Run until a signal (exit 0) or a child's own exit (exit 1)."""
        check_service_modules(self.services)
        # Everything that can refuse the start is checked before the data dir is made or
        # marked: a refused start leaves no files behind (a new dir stays absent).
        self.data_dir.check_format()
        self.data_dir.check_unused()
        self._resolve_ports()
        self.data_dir.lock()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stop.set)
        try:
            startup = asyncio.ensure_future(self._start_all())
            stop_wait = asyncio.ensure_future(self._stop.wait())
            await asyncio.wait({startup, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
            if not startup.done():  # stopped while starting
                self.out("streamboot up: stopping (interrupted during startup)")
                startup.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await startup
                return 0
            stop_wait.cancel()
            startup.result()  # raises StartupError
            return await self._watch()
        finally:
            await self._stop_all()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    async def _start_all(self) -> None:
        s = self.settings
        token = s.api_token or self.data_dir.api_token()
        dd = self.data_dir
        lines = [f"streamboot up: data dir {dd.path}"]
        # One NATS user per role (shared/bus_access.py); an external server is given the
        # same users (`streamboot secrets nats-config`) unless STREAMBOOT_NATS_USER names
        # one for every process.
        self._nats_passwords = dd.nats_passwords()

        new_pg_password = False
        if not s.database_url:
            pg_password, new_pg_password = dd.postgres_password()
            self.postgres = EmbeddedPostgres(
                dd.path, port=s.postgres_port, password=pg_password, host=EMBEDDED_HOST,
                user=s.postgres_user, bin_dir=s.postgres_bin_dir,
            )  # fmt: skip
            self.postgres.prepare()  # refuse a foreign/other-version database before any start

        if s.nats_url:
            nats_url = s.nats_url
            lines.append(f"  NATS         {without_password(nats_url)}  (external)")
        else:
            monitor = s.nats_monitor_port
            self.nats = EmbeddedNats(
                dd / "nats",
                port=s.nats_port,
                host=s.nats_listen_host or EMBEDDED_HOST,
                monitor_port=free_port(EMBEDDED_HOST) if monitor == 0 else monitor,
                users=role_users(self._nats_passwords),
            )
            await self.nats.start(log_path=dd / "logs" / "nats.log")
            self.children.append(_require(self.nats.process))
            nats_url = self.nats.url
            lines.append(
                f"  NATS         {nats_url}  (JetStream in {dd / 'nats'}; a user per "
                f"service, passwords in {dd / SECRETS_DIR})"
            )

        if self.postgres is None:
            self._database_url = str(s.database_url)
            database_url = without_password(self._database_url)
            lines.append(f"  PostgreSQL   {database_url}  (external)")
        else:
            await self.postgres.start(
                log_path=dd / "logs" / "postgres.log", new_password=new_pg_password
            )
            self.children.append(_require(self.postgres.process))
            self._database_url = self.postgres.dsn()
            database_url = self.postgres.url
            assert self.postgres.binaries is not None
            lines.append(
                f"  PostgreSQL   {database_url}  (PostgreSQL {self.postgres.binaries.major}, "
                f"data in {self.postgres.pgdata}, scram-sha-256 on loopback, password in "
                f"{dd / SECRETS_DIR / POSTGRES_PASSWORD_FILE})"
            )

        env = {
            # The embedded default keeps every boot's trace in DIR/traces.jsonl
            # (`streamboot trace show`); STREAMBOOT_TRACE_EXPORTER=otlp|none overrides.
            "STREAMBOOT_TRACE_EXPORTER": "jsonl",
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "STREAMBOOT_DATA_DIR": str(dd.path),
            "STREAMBOOT_NATS_URL": nats_url,
            "STREAMBOOT_API_TOKEN": token,
            **{f"STREAMBOOT_{f.upper()}": str(getattr(s, f)) for f in PORT_FIELDS},
        }
        self._service_env = env
        pids: dict[str, int] = {}
        for name in self.services:
            proc = await self._spawn_service(name)
            self.children.append(proc)
            pids[name] = proc.pid

        await self._wait_ready(nats_url)
        eps = endpoints(s)
        if self.nats is not None and self.nats.monitor_port:
            eps["nats_monitor"] = f"http://{EMBEDDED_HOST}:{self.nats.monitor_port}"
        self._runtime = {
            "pid": os.getpid(),
            "data_dir": str(dd.path),
            "started": time.time(),
            "nats_url": without_password(nats_url),
            "database_url": database_url,
            "api_url": eps["api"],
            "api_token_file": str(dd / API_TOKEN_FILE),
            "endpoints": eps,
            "services": pids,
        }
        dd.write_runtime(self._runtime)
        lines += [f"  {name:<12} {url}" for name, url in eps.items()]
        lines.append(f"  API token in {dd / API_TOKEN_FILE}; logs in {dd / 'logs'}")
        lines.append(
            "  services: " + (", ".join(f"{n} (pid {p})" for n, p in pids.items()) or "none")
        )
        lines.append("Running; Ctrl-C or SIGTERM stops everything.")
        for line in lines:
            self.out(line)

    async def _wait_ready(self, nats_url: str, timeout_s: float = 90.0) -> None:
        """Wait until every started service has sent its first heartbeat, so that the
        system is usable once `up` says "Running" and runtime.json exists."""
        if not self.services:
            return
        nc = await bus.connect(
            nats_url,
            "streamboot-up",
            credentials=self._credentials("cli"),
            connect_timeout_s=10,
        )
        try:
            js = nc.jetstream()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout_s
            while True:
                for child in self.children:
                    if not child.running:
                        raise StartupError(
                            f"{child.name} exited during startup:\n{child.log_tail()}"
                        )
                beats = await read_heartbeats(js, self.settings.heartbeat_timeout_s)
                ready = {b["service"] for b in beats if b["alive"] and b.get("pid") in self._pids()}
                waiting = [n for n in self.services if n not in ready]
                if not waiting:
                    return
                if loop.time() > deadline:
                    self.out(f"streamboot up: warning: no heartbeat yet from {', '.join(waiting)}")
                    return
                await asyncio.sleep(0.2)
        finally:
            await nc.close()

    def _pids(self) -> set[int]:
        return {c.pid for c in self.children}

    def _resolve_ports(self) -> None:
        """Pick free ports for 0s; refuse ports already taken, before starting anything (a
        readiness probe would otherwise happily talk to the other server on that port)."""
        s = self.settings
        skip = {"nats_port"} if s.nats_url else set()
        skip |= {"postgres_port"} if s.database_url else set()
        # Nothing binds a picked port until its server starts: never hand one out twice.
        taken = {getattr(s, field) for field in PORTS} - {0}
        for field, proto in PORTS.items():
            port = getattr(s, field)
            host = EMBEDDED_HOST if field in EMBEDDED_PORTS else s.bind_host
            if field == "nats_port" and s.nats_listen_host:
                host = s.nats_listen_host
            if port == 0:
                while (port := free_port(host)) in taken:
                    pass
                taken.add(port)
                setattr(s, field, port)
            elif field not in skip and port_in_use(host, port, udp=proto == "udp"):
                raise StartupError(
                    f"{proto.upper()} port {host}:{port} ({field}) is already in use, "
                    f"maybe by another `streamboot up`; set STREAMBOOT_{field.upper()} to "
                    "another port (0 = any free one)"
                )

    def _credentials(self, role: str) -> tuple[str, str] | None:
        """NATS credentials of ``role``: the settings' own user when given, or those in an
        external URL (every process then uses them), else the role's generated one."""
        s = self.settings
        if s.nats_user:
            return s.nats_user, s.nats_password or ""
        if s.nats_url and s.nats_credentials(role) is None:  # the URL carries its own
            return None
        return role, self._nats_passwords[role]

    async def _spawn_service(self, name: str) -> ManagedProcess:
        env = dict(self._service_env)
        if (credentials := self._credentials(name)) is not None:
            env["STREAMBOOT_NATS_USER"], env["STREAMBOOT_NATS_PASSWORD"] = credentials
        if name == "registry":  # the only service that talks to PostgreSQL
            env["STREAMBOOT_DATABASE_URL"] = self._database_url
        else:
            env.pop("STREAMBOOT_DATABASE_URL", None)
        return await spawn(f"service {name}", [sys.executable, "-m", f"services.{name}"], env=env)

    async def _watch(self) -> int:
        """Run until a stop signal (0), or a child exits that is not started again (1)."""
        waits = {asyncio.ensure_future(c.process.wait()): c for c in self.children}
        stop_wait = asyncio.ensure_future(self._stop.wait())
        try:
            while True:
                done, _ = await asyncio.wait(
                    {stop_wait, *waits}, return_when=asyncio.FIRST_COMPLETED
                )
                if stop_wait in done:
                    self.out("streamboot up: stopping")
                    return 0
                for task in [t for t in done if t in waits]:
                    child = waits.pop(task)
                    self.out(
                        f"streamboot up: {child.name} exited with code {child.process.returncode}"
                    )
                    if tail := child.log_tail():
                        self.out(tail)
                    again = await self._revive(child, stop_wait)
                    if again is None:
                        if self._stop.is_set():
                            break  # the stop signal is seen at the top of the loop
                        self.out("streamboot up: stopping everything")
                        return 1
                    waits[asyncio.ensure_future(again.process.wait())] = again
        finally:
            for task in [stop_wait, *waits]:
                task.cancel()

    async def _revive(
        self, child: ManagedProcess, stop_wait: asyncio.Future[bool]
    ) -> ManagedProcess | None:
        """Start ``child`` again after its backoff, trying again while the start fails;
        None when it must not be (a crash loop) or a stop signal came meanwhile."""
        while True:
            delay = self._restart_delay(child.name)
            if delay is None:
                return None
            await asyncio.wait({stop_wait}, timeout=delay)
            if self._stop.is_set():
                return None
            restart = asyncio.ensure_future(self._restart(child))
            await asyncio.wait({restart, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
            if not restart.done():  # a stop signal while PostgreSQL recovers, say
                restart.cancel()
                with contextlib.suppress(asyncio.CancelledError, StartupError):
                    await restart
                return None
            try:
                return restart.result()
            except StartupError as exc:
                self.out(f"streamboot up: {child.name} did not start again: {exc}")

    def _restart_delay(self, name: str) -> float | None:
        """How long to wait before starting child ``name`` again; None when it must not
        be: it exited RESTART_LIMIT times within RESTART_WINDOW_S."""
        now = time.monotonic()
        exits = [t for t in self._exits.get(name, []) if now - t < RESTART_WINDOW_S]
        exits.append(now)
        self._exits[name] = exits
        if len(exits) >= RESTART_LIMIT:
            self.out(
                f"streamboot up: {name} exited {len(exits)} times within "
                f"{RESTART_WINDOW_S:.0f} s; not starting it again"
            )
            return None
        return (len(exits) - 1) * RESTART_BACKOFF_S

    async def _restart(self, child: ManagedProcess) -> ManagedProcess:
        await child.stop(0)  # whatever is left of its process group goes
        await wait_group_gone(child.pid)  # e.g. postgres backends, still holding its memory
        logs = self.data_dir / "logs"
        if self.nats is not None and child is self.nats.process:
            await self.nats.start(log_path=logs / "nats.log")
            again = _require(self.nats.process)
            what = f"the services reconnect to {self.nats.url}"
        elif self.postgres is not None and child is self.postgres.process:
            # After a crash it replays its WAL first (up to max_wal_size): give it time.
            await self.postgres.start(log_path=logs / "postgres.log", wait_s=POSTGRES_RECOVERY_S)
            again = _require(self.postgres.process)
            what = "the registry reconnects; events wait in the services meanwhile"
        else:
            name = child.name.removeprefix("service ")
            again = await self._spawn_service(name)
            services = self._runtime.get("services")
            if isinstance(services, dict):
                services[name] = again.pid
                self.data_dir.write_runtime(self._runtime)
            what = ""
        self.children[self.children.index(child)] = again
        n = len(self._exits[child.name])
        self.out(
            f"streamboot up: {child.name} started again (pid {again.pid}; "
            f"{n} exit{'s' if n > 1 else ''} within {RESTART_WINDOW_S:.0f} s, "
            f"{RESTART_LIMIT} stop everything)" + (f"; {what}" if what else "")
        )
        return again

    async def _stop_all(self) -> None:
        """Services first (they may still flush to NATS/Postgres), then NATS, then Postgres."""
        self.data_dir.remove_runtime()
        services = [c for c in self.children if c.name.startswith("service ")]
        await asyncio.gather(*(c.stop(SERVICE_STOP_TIMEOUT_S) for c in services))
        if self.nats is not None:
            await self.nats.stop()
        if self.postgres is not None:
            await self.postgres.stop()
        self.data_dir.unlock()
        if self.children:
            self.out("streamboot up: stopped")


def _require(process: ManagedProcess | None) -> ManagedProcess:
    assert process is not None
    return process


def run_up(settings: Settings, services: Sequence[str]) -> int:
    """Entry for the CLI: returns the exit code, with startup errors printed, not traced."""
    raise_soft_limit()  # nats-server and PostgreSQL inherit it (each service raises its own)
    try:
        return asyncio.run(Supervisor(settings, services).run())
    except StartupError as exc:
        print(f"streamboot up: error: {exc}", file=sys.stderr, flush=True)
        return 2
