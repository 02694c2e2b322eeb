"""`streamboot registry ...`: maintenance of the registry's projections."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console

from streamboot.commands import DataDirOption
from streamboot.registry_api import run

app = typer.Typer(no_args_is_help=True, help="The registry's read models.")
JsonOption = Annotated[bool, typer.Option("--json", help="print JSON")]
console = Console(soft_wrap=True)


def show_rebuild(r: dict[str, Any]) -> None:
    same = "equal to" if r["equal_to_live"] else "DIFFERENT from"
    console.print(
        f"rebuilt from {r['events']} events (position {r['position']}) in {r['seconds']}s: "
        f"{same} the live state; {r['devices']} devices, {r['vdisks']} vdisks, "
        f"{r['live_sessions']} live sessions"
    )
    if r.get("projection_errors"):
        console.print(
            f"[yellow]{r['projection_errors']} event(s) could not be applied and were skipped "
            "(ProjectionError events in the log say which and why)[/yellow]"
        )


@app.command()
def rebuild(data_dir: DataDirOption, as_json: JsonOption = False) -> None:
    """Rebuild every projection from the event log (and check it equals the live state)."""
    result = run(data_dir, as_json, lambda c: c.post("/registry/rebuild"), show_rebuild)
    if not result["equal_to_live"]:
        raise typer.Exit(1)


@app.command()
def status(data_dir: DataDirOption, as_json: JsonOption = False) -> None:
    """Counts and the log position the registry has applied."""
    run(data_dir, as_json, lambda c: c.get("/registry/status"), lambda r: console.print(r))
