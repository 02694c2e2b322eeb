"""How CLI commands find the running system: DIR/runtime.json and DIR/api-token.

`streamboot up` writes both (see `streamboot.embedded.datadir`); these helpers read them and
tell a stale runtime.json (its `up` was killed) from a live one by the supervisor's lock.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from shared.settings import API_TOKEN_FILE, RUNTIME_FILE, Settings, default_data_dir, runtime_info
from streamboot.embedded.datadir import supervisor_running


class NotRunningError(RuntimeError):
    """No `streamboot up` is running on that data dir."""


def load_runtime(data_dir: Path | None = None) -> dict[str, Any]:
    """The endpoints of the `up` running on `data_dir` (default: env/./.streamboot)."""
    path = Path(data_dir) if data_dir is not None else default_data_dir()
    info = runtime_info(path)
    if not info:
        raise NotRunningError(
            f"streamboot is not running on {path} (no {RUNTIME_FILE}); "
            f"start it with `streamboot up --data-dir {path}`"
        )
    if not supervisor_running(path):
        raise NotRunningError(
            f"{path / RUNTIME_FILE} is stale: the `streamboot up` that wrote it is gone; "
            f"start it again with `streamboot up --data-dir {path}`"
        )
    return info


def api_token(data_dir: Path | None = None) -> str:
    """STREAMBOOT_API_TOKEN, else the token `up` generated in DIR/api-token."""
    path = Path(data_dir) if data_dir is not None else default_data_dir()
    token = Settings(data_dir=path).api_token
    if token:
        return token
    try:
        return (path / API_TOKEN_FILE).read_text().strip()
    except FileNotFoundError:
        raise NotRunningError(f"no API token in {path / API_TOKEN_FILE}") from None


def _client_args(data_dir: Path | None, timeout_s: float) -> dict[str, Any]:
    return {
        "base_url": load_runtime(data_dir)["api_url"],
        "headers": {"Authorization": f"Bearer {api_token(data_dir)}"},
        "timeout": timeout_s,
    }


def api_client(data_dir: Path | None = None, timeout_s: float = 10.0) -> httpx.Client:
    """An HTTP client for the admin API of the running system, bearer token included."""
    return httpx.Client(**_client_args(data_dir, timeout_s))


def async_api_client(data_dir: Path | None = None, timeout_s: float = 10.0) -> httpx.AsyncClient:
    return httpx.AsyncClient(**_client_args(data_dir, timeout_s))
