"""The CLI's client of the registry's REST API, and the CLI plumbing around it.

The CLI finds the running system through its data dir: ``runtime.json`` holds ``api_url``
and ``DATA_DIR/api-token`` the bearer token (``STREAMBOOT_API_URL`` and
``STREAMBOOT_API_TOKEN`` override both). Every CLI command prints a human view, or with
``--json`` the API's JSON; any error prints one line naming the problem and exits non-zero
(1: the request was refused, 3: the system is not reachable).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from shared.errors import OperatorError
from shared.runtime_files import API_TOKEN_FILE, runtime_info

EXIT_REFUSED = 1
EXIT_UNREACHABLE = 3


class ClientError(OperatorError):
    def __init__(
        self,
        message: str,
        kind: str = "error",
        exit_code: int = EXIT_REFUSED,
        rows: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.exit_code = exit_code
        # A refused file's errors, one per bad row ({"line", "error"}: `device import`).
        self.rows = rows or []


class RegistryClient:
    def __init__(self, api_url: str, token: str, timeout_s: float = 60.0) -> None:
        import httpx

        self.api_url = api_url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.api_url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout_s,
        )

    @classmethod
    def from_data_dir(cls, data_dir: Path, timeout_s: float = 60.0) -> RegistryClient:
        api_url = os.environ.get("STREAMBOOT_API_URL") or runtime_info(data_dir).get("api_url")
        if not api_url:
            raise ClientError(
                f"streamboot is not running with data dir {Path(data_dir).absolute()} "
                "(no runtime.json): start it with `streamboot up` or pass --data-dir",
                "unreachable",
                EXIT_UNREACHABLE,
            )
        token = os.environ.get("STREAMBOOT_API_TOKEN")
        if not token:
            try:
                token = (Path(data_dir) / API_TOKEN_FILE).read_text().strip()
            except OSError as exc:
                raise ClientError(
                    f"cannot read the API token {Path(data_dir) / API_TOKEN_FILE}: {exc.strerror}",
                    "unauthorized",
                ) from None
        return cls(api_url, token, timeout_s)

    def request(self, method: str, path: str, body: Any = None) -> Any:
        import httpx

        try:
            resp = self._http.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise ClientError(
                f"the registry API at {self.api_url} is not reachable ({exc})",
                "unreachable",
                EXIT_UNREACHABLE,
            ) from None
        try:
            data = resp.json()
        except ValueError:
            data = {"error": resp.text or resp.reason_phrase}
        if resp.status_code >= 400:
            if isinstance(data, dict) and "error" in data:
                rows = data.get("rows") if isinstance(data.get("rows"), list) else None
                raise ClientError(str(data["error"]), str(data.get("kind", "error")), rows=rows)
            raise ClientError(f"HTTP {resp.status_code}: {data}", "invalid")
        return data

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, body if body is not None else {})

    def patch(self, path: str, body: Any) -> Any:
        return self.request("PATCH", path, body)

    def put(self, path: str, body: Any) -> Any:
        return self.request("PUT", path, body)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)


def fail(exc: Exception, as_json: bool) -> NoReturn:
    """Print an error (one line on stderr; JSON on stdout too with --json) and exit."""
    kind = getattr(exc, "kind", "error")
    code = getattr(exc, "exit_code", EXIT_REFUSED)
    rows = getattr(exc, "rows", [])
    if as_json:
        print(json.dumps({"error": str(exc), "kind": kind} | ({"rows": rows} if rows else {})))
    print(f"error: {exc}", file=sys.stderr)
    for row in rows:
        print(f"  line {row.get('line')}: {row.get('error')}", file=sys.stderr)
    raise SystemExit(code)


@contextmanager
def cli_errors(as_json: bool) -> Iterator[None]:
    """Turn client and domain errors into a clear message and a non-zero exit."""
    try:
        yield
    except OperatorError as exc:
        fail(exc, as_json)


def run(
    data_dir: Path,
    as_json: bool,
    call: Callable[[RegistryClient], Any],
    render: Callable[[Any], None] | None = None,
) -> Any:
    """Connect, call, print: the shape of every CLI command."""
    with cli_errors(as_json):
        client = RegistryClient.from_data_dir(data_dir)
        result = call(client)
    print_result(result, as_json, render)
    return result


def print_result(result: Any, as_json: bool, render: Callable[[Any], None] | None) -> None:
    if as_json:
        print(json.dumps(result, indent=2, default=str))
    elif render is not None:
        render(result)
