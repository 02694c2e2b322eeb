"""`streamboot up`: run the whole system on this machine in the foreground."""

from __future__ import annotations

from typing import Annotated

import typer

from shared.settings import Settings
from streamboot.commands import DataDirOption
from streamboot.supervisor import SERVICES, run_up


def up(
    data_dir: DataDirOption,
    services: Annotated[
        str,
        typer.Option(
            help="comma-separated services to start ('' for none)",
            envvar="STREAMBOOT_SERVICES",
        ),
    ] = ",".join(SERVICES),
) -> None:
    """Start NATS, PostgreSQL and the services; Ctrl-C or SIGTERM stops everything.

    STREAMBOOT_NATS_URL / STREAMBOOT_DATABASE_URL use external servers instead of embedded
    ones; STREAMBOOT_<NAME>_PORT=0 picks free ports.
    """
    settings = Settings(data_dir=data_dir)
    names = [n.strip() for n in services.split(",") if n.strip()]
    raise typer.Exit(run_up(settings, names))
