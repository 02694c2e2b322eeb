"""The streamboot data dir: its format marker, the supervisor lock, the API token, runtime.json.

Layout of DIR:
    streamboot.json   {"format": N}: which layout this is (foreign/newer ones are refused)
    supervisor.lock   fcntl lock held by the running `up`, with its pid
    api-token         the admin API bearer token (0600), made at the first `up`
    secrets/          (0700) NATS passwords, one per role (nats-<role>), and the PostgreSQL
                      password (postgres), each 0600, made at the first `up`; deleting one
                      makes `up` generate it again at its next start
    runtime.json      endpoints of the running system (removed at stop)
    postgres/         PGDATA of the embedded PostgreSQL
    nats/             nats-server config and JetStream store
    logs/             nats and postgres logs
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import time
from pathlib import Path
from typing import IO, Any

from shared.bus_access import ROLES
from shared.settings import (
    API_TOKEN_FILE,
    POSTGRES_PASSWORD_FILE,
    RUNTIME_FILE,
    SECRETS_DIR,
    nats_password_file,
)
from streamboot.embedded.proc import StartupError

FORMAT = 1
MARKER_FILE = "streamboot.json"
LOCK_FILE = "supervisor.lock"


class DataDir:
    def __init__(self, path: Path) -> None:
        self.path = path.absolute()
        self._lock: IO[str] | None = None

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def check_format(self) -> None:
        """Refuse a dir that another version made, a corrupt one, or someone else's folder."""
        if self.path.exists() and not self.path.is_dir():
            raise StartupError(f"{self.path} exists and is not a directory")
        marker = self / MARKER_FILE
        if not marker.exists():
            if self.path.exists() and any(p.name != LOCK_FILE for p in self.path.iterdir()):
                raise StartupError(
                    f"{self.path} is not empty and has no {MARKER_FILE}: not a streamboot data "
                    "dir. Nothing was changed; choose an empty or new --data-dir."
                )
            return
        try:
            found = json.loads(marker.read_text())["format"]
        except (ValueError, KeyError, TypeError) as exc:
            raise StartupError(
                f"{marker} is corrupt ({exc}); nothing was changed. Fix or move the data dir."
            ) from None
        if found != FORMAT:
            newer = isinstance(found, int) and found > FORMAT
            raise StartupError(
                f"{self.path} has data format {found!r}, this streamboot uses {FORMAT}"
                + (" (the dir was made by a newer streamboot)" if newer else "")
                + ". Nothing was changed; use a matching streamboot or another --data-dir."
            )

    def ensure_marked(self) -> None:
        """Make the dir (refusing a foreign one) and mark it as ours."""
        self.check_format()
        self.path.mkdir(parents=True, exist_ok=True)
        marker = self / MARKER_FILE
        if not marker.exists():
            _write_atomic(marker, json.dumps({"format": FORMAT, "created": time.time()}) + "\n")

    def check_unused(self) -> None:
        """Refuse a dir another `up` holds, without creating or changing anything in it."""
        if supervisor_running(self.path):
            try:
                pid = (self / LOCK_FILE).read_text().strip() or "?"
            except OSError:
                pid = "?"
            raise StartupError(self._in_use(pid))

    def _in_use(self, pid: str) -> str:
        return (
            f"{self.path} is in use by another `streamboot up` (pid {pid}); stop it first "
            "or use another --data-dir"
        )

    def lock(self) -> None:
        """Take the supervisor lock (one `up` per dir), then mark the dir as ours."""
        self.check_format()
        self.path.mkdir(parents=True, exist_ok=True)
        handle = open(self / LOCK_FILE, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            pid = handle.read().strip() or "?"
            handle.close()
            raise StartupError(self._in_use(pid)) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._lock = handle
        self.remove_runtime()  # left by a supervisor that was killed -9
        self.ensure_marked()
        for sub in ("logs", "nats"):
            (self / sub).mkdir(exist_ok=True)

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing releases the flock
            self._lock = None

    def api_token(self) -> str:
        """The API bearer token, created (0600) on first use."""
        return _secret(self / API_TOKEN_FILE)

    def nats_passwords(self) -> dict[str, str]:
        """The NATS password of every role (shared/bus_access.py), created on first use."""
        self._secrets_dir()
        return {role: _secret(nats_password_file(self.path, role)) for role in ROLES}

    def postgres_password(self) -> tuple[str, bool]:
        """The embedded PostgreSQL's password, and whether it was made just now."""
        path = self._secrets_dir() / POSTGRES_PASSWORD_FILE
        new = not path.exists()
        return _secret(path), new

    def _secrets_dir(self) -> Path:
        path = self / SECRETS_DIR
        path.mkdir(mode=0o700, exist_ok=True)
        path.chmod(0o700)
        return path

    def write_runtime(self, info: dict[str, Any]) -> None:
        _write_atomic(self / RUNTIME_FILE, json.dumps(info, indent=2) + "\n")

    def remove_runtime(self) -> None:
        (self / RUNTIME_FILE).unlink(missing_ok=True)


def supervisor_running(data_dir: Path) -> bool:
    """Whether an `up` holds the lock of `data_dir` (a stale runtime.json means no)."""
    try:
        handle = open(Path(data_dir) / LOCK_FILE)
    except FileNotFoundError:
        return False
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        return False


def _secret(path: Path) -> str:
    """The secret in ``path``, generated (0600 from its creation) when missing."""
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    return path.read_text().strip()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
