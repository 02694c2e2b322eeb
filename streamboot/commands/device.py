"""`streamboot device ...`: add, list, show, update, disable, enable, remove devices."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from streamboot.commands import DataDirOption
from streamboot.commands.chap import (
    ChapReverseSecret,
    ChapReverseUser,
    ChapSecret,
    ChapUser,
    NoChap,
    chap_call,
)
from streamboot.registry_api import run
from streamboot.tables import print_rows

app = typer.Typer(no_args_is_help=True, help="Devices (client machines), keyed by MAC.")
JsonOption = Annotated[bool, typer.Option("--json", help="print JSON")]
console = Console(soft_wrap=True)
KERNEL_ARGS_HELP = (
    "extra kernel arguments of its kernel-direct boots, e.g. 'console=ttyS0' (words of "
    "letters, digits and ._:/=,+-; '' clears them)"
)


def show_device(d: dict[str, Any]) -> None:
    a = d.get("assignment") or {}
    state = "enabled" if d["enabled"] else "DISABLED"
    console.print(f"[bold]{d['mac']}[/]  {d['hostname']}  ({state})")
    console.print(f"  machine id   {d['machine_id']}")
    console.print(f"  SMBIOS UUID  {d['smbios_uuid'] or '-'}")
    console.print(f"  collection   {d['collection'] or '-'}")
    console.print(f"  tester       {'yes' if d['tester'] else 'no'}")
    console.print(f"  kernel args  {d.get('kernel_args') or '-'}")
    if d.get("chap"):
        c = d["chap"]
        mutual = f", mutual as {c['reverse_user']}" if c["mutual"] else ""
        console.print(f"  iSCSI CHAP   {c['user']}{mutual}  [from {c['source']}]")
    vdisks = ", ".join(
        v + (" (default)" if v == a.get("default") else "") for v in a.get("vdisks", [])
    )
    console.print(
        f"  vdisks       {vdisks or '-'}" + (f"  [from {a['source']}]" if a.get("source") else "")
    )
    console.print(f"  session      {d.get('session') or '-'}")
    if d.get("maintenance"):
        console.print(
            "  maintenance  on: its next PXE boot maintains "
            f"{d.get('maintenance_vdisk') or a.get('default') or 'its default vdisk'} read-write"
        )


def show_devices(devices: list[dict[str, Any]]) -> None:
    rows = []
    for d in devices:
        a = d.get("assignment") or {}
        rows.append([
            d["mac"], d["hostname"], d["collection"] or "-", "yes" if d["tester"] else "",
            ("enabled" if d["enabled"] else "disabled")
            + (", maintenance" if d.get("maintenance") else ""),
            ", ".join(a.get("vdisks", [])) or "-", d.get("session") or "-",
        ])  # fmt: skip
    headers = ("MAC", "hostname", "collection", "tester", "state", "vdisks", "session")
    print_rows(console, headers, rows, ids=("MAC", "session"))


@app.command()
def add(
    mac: str,
    data_dir: DataDirOption,
    hostname: Annotated[str | None, typer.Option(help="unique hostname")] = None,
    uuid: Annotated[str | None, typer.Option("--uuid", help="SMBIOS UUID")] = None,
    collection: Annotated[str | None, typer.Option(help="collection (group) name")] = None,
    tester: Annotated[bool, typer.Option(help="boots the test version of its vdisks")] = False,
    kernel_args: Annotated[str | None, typer.Option(help=KERNEL_ARGS_HELP)] = None,
    as_json: JsonOption = False,
) -> None:
    """Register a device by MAC."""
    body = {
        "mac": mac,
        "hostname": hostname,
        "smbios_uuid": uuid,
        "collection": collection,
        "tester": tester,
        "kernel_args": kernel_args,
    }
    run(data_dir, as_json, lambda c: c.post("/devices", body), show_device)


@app.command("import")
def import_(
    csv_file: Annotated[Path, typer.Argument(help="CSV with a header row: mac,hostname,...")],
    data_dir: DataDirOption,
    as_json: JsonOption = False,
) -> None:
    """Register many devices from a CSV file: all of its rows or, if one is bad, none.

    Columns (header row, any order): mac (required), hostname, collection, tester
    (yes/no), kernel_args, smbios_uuid, vdisks (space- or ;-separated, the first the
    default). A refused file prints an error per bad row."""
    try:
        text = csv_file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise typer.BadParameter(f"cannot read {csv_file}: {exc}") from None
    run(
        data_dir,
        as_json,
        lambda c: c.post("/devices/import", {"csv": text}),
        lambda r: console.print(
            f"imported {r['imported']} device(s), {r['assigned']} with their vdisks assigned"
        ),
    )


@app.command("list")
def list_(data_dir: DataDirOption, as_json: JsonOption = False) -> None:
    """List devices."""
    run(data_dir, as_json, lambda c: c.get("/devices"), show_devices)


@app.command()
def show(mac: str, data_dir: DataDirOption, as_json: JsonOption = False) -> None:
    """Show one device, its assignment and live session."""
    run(data_dir, as_json, lambda c: c.get(f"/devices/{mac}"), show_device)


@app.command()
def update(
    mac: str,
    data_dir: DataDirOption,
    hostname: Annotated[str | None, typer.Option()] = None,
    uuid: Annotated[str | None, typer.Option("--uuid")] = None,
    collection: Annotated[str | None, typer.Option(help="'' leaves the collection")] = None,
    tester: Annotated[bool | None, typer.Option("--tester/--no-tester")] = None,
    kernel_args: Annotated[str | None, typer.Option(help=KERNEL_ARGS_HELP)] = None,
    chap_user: ChapUser = None,
    chap_secret: ChapSecret = None,
    chap_reverse_user: ChapReverseUser = None,
    chap_reverse_secret: ChapReverseSecret = None,
    no_chap: NoChap = False,
    as_json: JsonOption = False,
) -> None:
    """Change a device's hostname, SMBIOS UUID, collection, tester flag, kernel arguments or
    the CHAP credentials of its iSCSI logins."""
    body = {
        "hostname": hostname,
        "smbios_uuid": uuid,
        "collection": collection,
        "tester": tester,
        "kernel_args": kernel_args,
    }
    chap = chap_call(
        f"/devices/{mac}/chap",
        chap_user,
        chap_secret,
        chap_reverse_user,
        chap_reverse_secret,
        no_chap,
    )

    def call(c: Any) -> Any:
        if chap is not None:
            chap(c)
        return c.patch(f"/devices/{mac}", body)

    run(data_dir, as_json, call, show_device)


app.command("set", help="The same as `device update`.")(update)


@app.command()
def disable(mac: str, data_dir: DataDirOption, as_json: JsonOption = False) -> None:
    """Disable a device: it cannot open boot sessions."""
    run(data_dir, as_json, lambda c: c.post(f"/devices/{mac}/disable"), show_device)


@app.command()
def enable(mac: str, data_dir: DataDirOption, as_json: JsonOption = False) -> None:
    """Enable a disabled device."""
    run(data_dir, as_json, lambda c: c.post(f"/devices/{mac}/enable"), show_device)


@app.command()
def remove(mac: str, data_dir: DataDirOption, as_json: JsonOption = False) -> None:
    """Remove a device (refused while it has a live session)."""
    run(
        data_dir,
        as_json,
        lambda c: c.delete(f"/devices/{mac}"),
        lambda r: console.print(f"removed device {r['removed']}"),
    )


@app.command()
def maintenance(
    mac: str,
    state: Annotated[str, typer.Argument(help="on|off")],
    data_dir: DataDirOption,
    as_json: JsonOption = False,
) -> None:
    """Put a device in maintenance (on: its next PXE boots open a read-write maintenance
    session on its default vdisk; `streamboot vdisk commit` publishes the writes) or not."""
    if state not in ("on", "off"):
        raise typer.BadParameter(f"{state!r}: on or off", param_hint="STATE")
    body = {"on": state == "on"}
    run(data_dir, as_json, lambda c: c.post(f"/devices/{mac}/maintenance", body), show_device)


@app.command()
def wake(
    data_dir: DataDirOption,
    mac: Annotated[str | None, typer.Argument(help="the device's MAC")] = None,
    collection: Annotated[
        str | None, typer.Option(help="wake every device of this collection")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Power a device on with a Wake-on-LAN packet (sent by the registry, out of the boot
    interface); it then PXE-boots as usual."""
    if (mac is None) == (collection is None):
        raise typer.BadParameter("give a MAC or --collection, not both", param_hint="MAC")

    def call(c: Any) -> Any:
        if mac is not None:
            return [c.post(f"/devices/{mac}/wake")]
        macs = [d["mac"] for d in c.get("/devices") if d["collection"] == collection]
        if not macs:
            raise typer.BadParameter(f"collection {collection!r} has no devices")
        return [c.post(f"/devices/{m}/wake") for m in macs]

    run(
        data_dir,
        as_json,
        call,
        lambda woken: [
            console.print(f"woke {w['mac']} ({w['hostname']}): packet sent to {w['sent_to']}")
            for w in woken
        ],
    )
