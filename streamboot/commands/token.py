"""`streamboot token create|list|revoke`: named admin API tokens of a role (admin only)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from streamboot.commands import DataDirOption
from streamboot.registry_api import run

app = typer.Typer(
    no_args_is_help=True,
    help="Admin API tokens: admin (everything), operator (devices, assignments, sessions), "
    "viewer (read-only).",
)
JsonOption = Annotated[bool, typer.Option("--json", help="print JSON")]
console = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def show_created(t: dict[str, Any]) -> None:
    # The token alone on stdout (scripts capture it); the advice on stderr.
    print(t["token"])
    err.print(
        f"API token {t['name']!r} (role {t['role']}): shown once, only its hash is kept; "
        "use it as STREAMBOOT_API_TOKEN or `Authorization: Bearer <token>`"
    )


def show_tokens(tokens: list[dict[str, Any]]) -> None:
    table = Table("name", "role", "created", "by", "last change", "revoked")
    for t in tokens:
        table.add_row(
            t["name"],
            t["role"],
            when(t["created_at"]),
            t["created_by"],
            when(t["last_action_at"]),
            when(t["revoked_at"]),
        )
    console.print(table)


@app.command()
def create(
    data_dir: DataDirOption,
    name: Annotated[str, typer.Option(help="the token's name, recorded with what it does")],
    role: Annotated[str, typer.Option(help="admin, operator or viewer")],
    as_json: JsonOption = False,
) -> None:
    """Create a token and print it (once: the registry keeps only its hash)."""
    body = {"name": name, "role": role}
    run(data_dir, as_json, lambda c: c.post("/tokens", body), show_created)


@app.command("list")
def list_(data_dir: DataDirOption, as_json: JsonOption = False) -> None:
    """List the tokens: name, role, created, last mutating request, revoked."""
    run(data_dir, as_json, lambda c: c.get("/tokens"), show_tokens)


@app.command()
def revoke(name: str, data_dir: DataDirOption, as_json: JsonOption = False) -> None:
    """Revoke a token: it is refused (401) from now on; its name is never reused."""
    run(
        data_dir,
        as_json,
        lambda c: c.delete(f"/tokens/{name}"),
        lambda t: console.print(f"revoked API token {t['name']} ({t['role']})"),
    )
