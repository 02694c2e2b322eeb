"""Child processes that never outlive their parent.

Every server and service that `streamboot up` (or the test fixtures) starts goes through
`spawn`: the child gets its own process group (so a terminal's Ctrl-C reaches only the
supervisor, which then stops children in order) and a parent-death signal (so even a
`kill -9` of the supervisor leaves no orphans). `ManagedProcess.stop` signals politely,
waits, then kills the whole group.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import pwd
import random
import signal
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


class StartupError(RuntimeError):
    """A server or service could not start; the message says why and what to do."""


@dataclass(frozen=True)
class RunAs:
    """An unprivileged OS user to drop to before exec (used for postgres under root)."""

    name: str
    uid: int
    gid: int

    @classmethod
    def lookup(cls, name: str) -> RunAs:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise StartupError(
                f"user {name!r} does not exist; set STREAMBOOT_POSTGRES_USER to an existing "
                "unprivileged user"
            ) from None
        if entry.pw_uid == 0:
            raise StartupError(f"user {name!r} is root; postgres needs an unprivileged user")
        return cls(name=name, uid=entry.pw_uid, gid=entry.pw_gid)


def _child_setup(death_signal: int, run_as: RunAs | None) -> Callable[[], None]:
    parent_pid = os.getpid()

    def setup() -> None:
        # Runs in the child between fork and exec. Credentials first: changing them clears
        # the parent-death signal, so prctl must come after.
        if run_as is not None:
            os.setgroups([])
            os.setgid(run_as.gid)
            os.setuid(run_as.uid)
        _libc.prctl(_PR_SET_PDEATHSIG, death_signal, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os.kill(os.getpid(), death_signal)

    return setup


@dataclass
class ManagedProcess:
    """A started child plus how to stop it gracefully."""

    name: str
    process: asyncio.subprocess.Process
    stop_signal: int
    log_path: Path | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process.returncode is None

    def log_tail(self, lines: int = 20) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    async def stop(self, grace_s: float = 15.0) -> int:
        """Stop politely, then kill the whole process group; returns the exit code."""
        if self.running:
            _signal(self.pid, self.stop_signal)
            try:
                await asyncio.wait_for(self.process.wait(), grace_s)
            except TimeoutError:
                _killpg(self.pid, signal.SIGKILL)
        # Grandchildren (postgres backends, a service's helpers) share the group.
        _killpg(self.pid, signal.SIGKILL)
        return await self.process.wait()


async def wait_group_gone(pgid: int, timeout_s: float = 10.0) -> None:
    """Until no process of group ``pgid`` is left (after a SIGKILL they take a moment to
    go), or ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        except PermissionError:
            pass  # members under another user (postgres dropped to it): still there
        await asyncio.sleep(0.05)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


async def spawn(
    name: str,
    argv: Sequence[str | os.PathLike[str]],
    *,
    env: Mapping[str, str] | None = None,
    log_path: Path | None = None,
    cwd: Path | None = None,
    stop_signal: int = signal.SIGTERM,
    death_signal: int = signal.SIGTERM,
    run_as: RunAs | None = None,
) -> ManagedProcess:
    """Start `argv` in its own process group; output goes to `log_path` (else inherited)."""
    # A local file opened once per child: not worth a thread.
    log: IO[bytes] | None = open(log_path, "ab") if log_path else None  # noqa: ASYNC230
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT if log else None,
            start_new_session=True,
            preexec_fn=_child_setup(death_signal, run_as),
        )
    except OSError as exc:
        raise StartupError(f"cannot start {name} ({argv[0]}): {exc}") from exc
    finally:
        if log is not None:
            log.close()  # the child holds its own copy
    return ManagedProcess(name=name, process=process, stop_signal=stop_signal, log_path=log_path)


# Ports picked for ``*_PORT=0`` lie from here up to the kernel's ephemeral range.
PICKED_PORT_FLOOR = 20000


def ephemeral_port_floor() -> int:
    """The lowest port the kernel gives outgoing connections (ip_local_port_range)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now for TCP and UDP on `host` (tests, `*_PORT=0`; TFTP/DHCP are UDP).

    Picked below the kernel's ephemeral range: a port from ``bind(0)`` is an ephemeral one,
    which any process's outgoing connection may be given before our server binds it (seen:
    `streamboot up`'s registry API port, "address already in use")."""
    top = ephemeral_port_floor()
    for _ in range(1000 if top > PICKED_PORT_FLOOR else 0):
        port = random.randrange(PICKED_PORT_FLOOR, top)
        if free_for_both(host, port):
            return port
    while True:  # no room below the ephemeral range: any free port
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((host, 0))
            port = tcp.getsockname()[1]
        if free_for_both(host, port):
            return port


def free_for_both(host: str, port: int) -> bool:
    return not port_in_use(host, port) and not port_in_use(host, port, udp=True)


def port_in_use(host: str, port: int, udp: bool = False) -> bool:
    """Whether something listens on `host:port` already. SO_REUSEADDR like the servers do,
    so a port only in TIME_WAIT after a restart does not count."""
    kind = socket.SOCK_DGRAM if udp else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
        return False


async def wait_for_tcp(proc: ManagedProcess, host: str, port: int, wait_s: float) -> None:
    """Wait until `host:port` accepts TCP connections, failing fast if `proc` dies."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while True:
        if not proc.running:
            raise StartupError(
                f"{proc.name} exited with code {proc.process.returncode} during startup"
                + (f"; last log lines:\n{proc.log_tail()}" if proc.log_path else "")
            )
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            if loop.time() > deadline:
                raise StartupError(
                    f"{proc.name} did not listen on {host}:{port} within {wait_s:.0f}s"
                ) from None
            await asyncio.sleep(0.02)
            continue
        writer.close()
        await writer.wait_closed()
        return
