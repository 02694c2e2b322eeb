"""`streamboot session ...`: open, close and list boot sessions."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer
from rich.console import Console

from streamboot.commands import DataDirOption
from streamboot.registry_api import run
from streamboot.tables import print_rows

app = typer.Typer(no_args_is_help=True, help="Boot sessions.")
JsonOption = Annotated[bool, typer.Option("--json", help="print JSON")]
console = Console(soft_wrap=True)


def show_opened(s: dict[str, Any]) -> None:
    console.print(
        f"session {s['session_id']}: {s['mac']} ({s['hostname']}) boots {s['vdisk']} v{s['version']}"
    )
    console.print(f"  token        {s['token']}")
    console.print(f"  NBD          {s['nbd_uri']}")
    console.print(f"  HTTP         {s['http_url']}")
    console.print(f"  write cache  {s['write_cache']} ({s['write_cache_persistence']})")
    console.print(f"  stream node  {s['stream_node'] or '-'}")
    if s.get("warning"):
        print(f"warning: {s['warning']}", file=sys.stderr)


def show_sessions(sessions: list[dict[str, Any]]) -> None:
    rows = []
    for s in sessions:
        # A replay (`streamboot replay blocks`) shows the device it replays, said as such.
        host = s["hostname"] + (f" (replay of {s['replay_of']})" if s.get("replay_of") else "")
        rows.append([
            s["session_id"], s["mac"], host, s["vdisk"], str(s["version"]),
            s["stream_node"] or "-", str(s["attached"]),
            f"{s.get('bytes_read', 0) / 2**20:,.1f} / {s.get('bytes_written', 0) / 2**20:,.1f}",
            write_cache_usage(s),
        ])  # fmt: skip
    headers = ("session", "MAC", "hostname", "vdisk", "version", "node", "attached",
               "read / written MiB", "write cache")  # fmt: skip
    print_rows(console, headers, rows, ids=("session", "MAC"))


def write_cache_usage(s: dict[str, Any]) -> str:
    used, capacity = s.get("write_cache_used"), s.get("write_cache_capacity")
    if used is None:
        return f"{s['write_cache']} (usage unknown)"
    mib = f"{used / 2**20:,.1f} MiB"
    text = f"{mib} of {capacity / 2**20:,.0f} MiB" if capacity else mib
    # Which cache node holds it (there may be several).
    return f"{text} on {s['write_cache_node']}" if s.get("write_cache_node") else text


@app.command("open")
def open_(
    mac: str,
    data_dir: DataDirOption,
    vdisk: Annotated[str | None, typer.Option(help="vdisk (default: the device's default)")] = None,
    maintenance: Annotated[
        bool, typer.Option(help="boot the maintenance version read-write")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Open a boot session for a device: prints its token and NBD/HTTP endpoints."""
    body = {"mac": mac, "vdisk": vdisk, "maintenance": maintenance}
    run(data_dir, as_json, lambda c: c.post("/sessions", body), show_opened)


@app.command()
def close(token: str, data_dir: DataDirOption, as_json: JsonOption = False) -> None:
    """Close a session by its token (or its session id)."""
    run(
        data_dir,
        as_json,
        lambda c: c.delete(f"/sessions/{token}"),
        lambda r: console.print(f"closed session {r['closed']}"),
    )


@app.command("list")
def list_(data_dir: DataDirOption, as_json: JsonOption = False) -> None:
    """List live sessions."""
    run(data_dir, as_json, lambda c: c.get("/sessions"), show_sessions)
