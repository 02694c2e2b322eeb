"""`streamboot assign TARGET VDISK [--default]`: give a device (or a collection) a vdisk."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console

from streamboot.commands import DataDirOption
from streamboot.registry_api import run

# One command, registered in streamboot.cli as `app.command()(assign.assign)`.
console = Console(soft_wrap=True)


def show_assignment(a: dict[str, Any]) -> None:
    vdisks = ", ".join(v + (" (default)" if v == a["default"] else "") for v in a["vdisks"])
    console.print(f"{a['target_kind']} {a['target']}: {vdisks or 'nothing assigned'}")


def assign(
    target: Annotated[
        str, typer.Argument(help="device MAC, or a collection name with --collection")
    ],
    vdisk: Annotated[str, typer.Argument(help="vdisk name")],
    data_dir: DataDirOption,
    default: Annotated[bool, typer.Option(help="make it the default vdisk")] = False,
    collection: Annotated[bool, typer.Option(help="TARGET is a collection")] = False,
    remove: Annotated[bool, typer.Option(help="remove the vdisk from TARGET")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Append VDISK to the ordered vdisks of TARGET (the first becomes the default)."""
    kind = "collection" if collection else "device"
    if remove:
        call = lambda c: c.delete(f"/assignments/{kind}/{target}/{vdisk}")  # noqa: E731
    else:
        body = {"target_kind": kind, "target": target, "vdisk": vdisk, "default": default}
        call = lambda c: c.post("/assignments", body)  # noqa: E731
    run(data_dir, as_json, call, show_assignment)
