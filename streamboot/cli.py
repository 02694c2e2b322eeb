"""The `streamboot` command: a thin assembler of the command modules in streamboot.commands.

To add a command group: write `streamboot/commands/<name>.py` with `app = typer.Typer()`
and register it below with one line, `app.add_typer(<name>.app, name="<name>")`.
"""

from __future__ import annotations

import typer
import typer.core

from streamboot.commands import (
    assign,
    chap,
    client,
    device,
    dhcp,
    events,
    job,
    registry,
    replay,
    secrets,
    session,
    status,
    token,
    trace,
    up,
    vdisk,
)

_value_type = typer.core.TyperOption.display_type_rich


def _flag_shows_no_type(self: typer.core.TyperOption, ctx: typer.Context) -> str | None:
    """A flag (``--json``, ``--help``) takes no value: its help names no ``<bool>`` type,
    which would read as if it wanted one."""
    return None if self.is_flag else _value_type(self, ctx)


typer.core.TyperOption.display_type_rich = _flag_shows_no_type  # type: ignore[method-assign]

app = typer.Typer(no_args_is_help=True, help="OS streaming for diskless machines.")


@app.callback()
def _root() -> None:
    """OS streaming for diskless machines."""  # keeps `streamboot CMD` a group


app.command()(up.up)
app.command()(status.status)
app.add_typer(events.app, name="events")
app.add_typer(device.app, name="device")
app.add_typer(chap.app, name="collection")
app.add_typer(vdisk.app, name="vdisk")
app.add_typer(job.app, name="job")
app.command()(assign.assign)
app.add_typer(session.app, name="session")
app.add_typer(registry.app, name="registry")
app.add_typer(dhcp.app, name="dhcp")
app.add_typer(trace.app, name="trace")
app.add_typer(replay.app, name="replay")
app.add_typer(token.app, name="token")
app.add_typer(secrets.app, name="secrets")
app.add_typer(client.app, name="client")


def main() -> None:
    app()
