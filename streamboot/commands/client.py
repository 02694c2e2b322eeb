"""`streamboot client ...`: the Linux client packages an operator installs into an image."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True, help="the Linux client installed into vdisk images.")


@app.command()
def package(
    output: Annotated[Path, typer.Option("--output", help="directory for the packages")],
) -> None:
    """Build streamboot-client_<version>_all.deb (Debian, Ubuntu) and the dracut module's
    tarball (Fedora, RHEL, openSUSE: make install). The .deb's path is the last line."""
    from streamboot.client_package import PackageError, build_deb, build_dracut_tarball

    try:
        tarball = build_dracut_tarball(output)
        deb = build_deb(output)
    except (PackageError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(str(tarball))
    typer.echo(str(deb))
