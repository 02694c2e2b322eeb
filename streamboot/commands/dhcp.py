"""`streamboot dhcp leases`: the addresses the boot service's full DHCP has handed out."""

from __future__ import annotations

import json
import time
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from streamboot.commands import DataDirOption

app = typer.Typer(no_args_is_help=True, help="DHCP (full mode) of the boot service.")


@app.command()
def leases(
    data_dir: DataDirOption,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """The lease file of full DHCP mode (kept across restarts under the data dir)."""
    from shared.contracts.boot import leases_path, read_leases
    from shared.settings import Settings

    items = read_leases(leases_path(Settings(data_dir=data_dir)))
    now = time.time()
    for item in items:
        item["active"] = float(item["expires"]) > now  # type: ignore[arg-type]
    if as_json:
        typer.echo(json.dumps(items, indent=2))
        return
    table = Table(title=f"DHCP leases ({len(items)})")
    for col in ("ip", "mac", "state", "hostname", "expires"):
        table.add_column(col)
    for item in items:
        expires = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(item["expires"])))  # type: ignore[arg-type]
        state = str(item["state"]) + ("" if item["active"] else " (expired)")
        table.add_row(
            str(item["ip"]), str(item["mac"]), state, str(item.get("hostname") or "-"), expires
        )
    Console().print(table)
