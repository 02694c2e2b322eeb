"""`streamboot job list|show`: imports and commits, under way and recently ended (the
console's vdisks page shows the same, live)."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import quote

import typer
from rich.console import Console

from shared.vdisk_store import PHASES
from streamboot.commands import DataDirOption
from streamboot.commands.token import when
from streamboot.registry_api import run
from streamboot.tables import print_rows

app = typer.Typer(no_args_is_help=True, help="Imports and commits: under way and recently ended.")
JsonOption = Annotated[bool, typer.Option("--json", help="print JSON")]
console = Console(soft_wrap=True)


def where(j: dict[str, Any]) -> str:
    """How far it got, in words: the phase and percent while running, else how it ended."""
    phase = PHASES.get(j["phase"], j["phase"])
    percent = f" {j['percent']}%" if j["percent"] is not None else ""
    if j["state"] == "running":
        return phase + percent
    if j["state"] == "done":
        return f"v{j['version']}" if j["version"] else "-"
    return f"at {phase}{percent}: {j['error'] or '-'}"


def show_jobs(jobs: list[dict[str, Any]]) -> None:
    if not jobs:
        console.print("no imports or commits yet")
        return
    rows = [
        [j["id"], j["kind"], j["vdisk"], j["state"], where(j), j["by"], when(j["started_at"])]
        for j in jobs
    ]
    headers = ("job", "kind", "vdisk", "state", "progress / result", "by", "started")
    print_rows(console, headers, rows, ids=("job", "vdisk"))


@app.command("list")
def list_(
    data_dir: DataDirOption,
    vdisk: Annotated[str | None, typer.Option(help="only this vdisk's")] = None,
    as_json: JsonOption = False,
) -> None:
    """List imports and commits, newest first: under way, done, failed, interrupted."""
    path = "/jobs" + (f"?vdisk={quote(vdisk)}" if vdisk else "")
    run(data_dir, as_json, lambda c: c.get(path), show_jobs)


@app.command()
def show(job: str, data_dir: DataDirOption, as_json: JsonOption = False) -> None:
    """One job: its phase and progress, or how it ended."""
    run(data_dir, as_json, lambda c: c.get(f"/jobs/{job}"), lambda j: show_jobs([j]))
