"""`streamboot secrets`: the credentials `up` generates, for servers it does not run."""

from __future__ import annotations

import typer

from streamboot.commands import DataDirOption

app = typer.Typer(no_args_is_help=True, help="Credentials of the data dir.")


@app.command("nats-config")
def nats_config(data_dir: DataDirOption) -> None:
    """Print the nats-server `authorization` block of this data dir's users (one per role,
    passwords in DATA_DIR/secrets, made now if missing), for an external NATS that
    `up` reaches through STREAMBOOT_NATS_URL."""
    from shared.bus_access import authorization_block, role_users
    from streamboot.embedded.datadir import DataDir
    from streamboot.embedded.proc import StartupError

    dd = DataDir(data_dir)
    try:
        dd.ensure_marked()
    except StartupError as exc:
        typer.echo(f"streamboot secrets: error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(
        f"# streamboot's NATS users (passwords from {dd / 'secrets'}); permissions: "
        "docs/security.md. Keep this file readable only by the server's user."
    )
    typer.echo(authorization_block(role_users(dd.nats_passwords())), nl=False)
