"""`streamboot client ...`: the Linux client packages an operator installs into an image,
and a client VM on this machine (`client vm MAC`) to watch a boot without a lab."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from streamboot.commands import DataDirOption

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


@app.command()
def vm(
    mac: Annotated[str, typer.Argument(help="the VM's MAC: a device you added and assigned")],
    data_dir: DataDirOption,
    memory: Annotated[int, typer.Option(help="the VM's memory, MiB")] = 512,
    kvm: Annotated[bool, typer.Option("--kvm", help="use KVM (faster, where it works)")] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="print the QEMU command instead of running it")
    ] = False,
) -> None:
    """Boot a VM on this machine from the running system (QEMU, its serial console here;
    Ctrl-A X quits). Watch it on the console's Boots page."""
    from shared.errors import OperatorError
    from shared.identity import normalize_mac
    from shared.settings import runtime_info
    from streamboot.demo_vm import boot_entry_url, missing_tools, vm_argv

    try:
        mac = normalize_mac(mac)
        argv = vm_argv(boot_entry_url(runtime_info(data_dir)), mac, memory, kvm)
    except (OperatorError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    if dry_run:
        typer.echo(" ".join(argv))
        return
    if missing := missing_tools():
        typer.echo(f"error: install {' '.join(missing)} first (apt)", err=True)
        raise typer.Exit(1)
    typer.echo(f"booting {mac} from the network; Ctrl-A X quits QEMU", err=True)
    os.execvp(argv[0], argv)
