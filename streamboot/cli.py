"""The `streamboot` command: a thin assembler of the command modules in streamboot.commands.

To add a command group: write `streamboot/commands/<name>.py` with `app = typer.Typer()`
and register it below with one line, `app.add_typer(<name>.app, name="<name>")`.
"""

from __future__ import annotations

import typer

from streamboot.commands import events, status, up

app = typer.Typer(no_args_is_help=True, help="OS streaming for diskless machines.")


@app.callback()
def _root() -> None:
    """OS streaming for diskless machines."""  # keeps `streamboot CMD` a group


app.command()(up.up)
app.command()(status.status)
app.add_typer(events.app, name="events")


def main() -> None:
    app()
