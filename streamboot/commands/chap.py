"""CHAP options of `streamboot device set` and `streamboot collection set`, and the
`collection` command group: list, create (devices and/or a vdisk), rename, delete, CHAP
set/show."""

from __future__ import annotations

import sys
from typing import Annotated, Any
from urllib.parse import quote

import typer
from rich.console import Console

from streamboot.commands import DataDirOption
from streamboot.registry_api import run
from streamboot.tables import print_rows

app = typer.Typer(no_args_is_help=True, help="Collections (groups of devices).")
console = Console(soft_wrap=True)

ChapUser = Annotated[
    str | None, typer.Option("--chap-user", help="CHAP name its iSCSI logins must give")
]
ChapSecret = Annotated[
    str | None,
    typer.Option(
        "--chap-secret",
        help="CHAP secret (12-64 of letters, digits, ._+=-; Windows takes 12-16); '-' reads "
        "it from stdin, out of the process list",
    ),
]
ChapReverseUser = Annotated[
    str | None,
    typer.Option("--chap-reverse-user", help="mutual CHAP: the name the target answers with"),
]
ChapReverseSecret = Annotated[
    str | None,
    typer.Option("--chap-reverse-secret", help="mutual CHAP: the target's secret ('-': stdin)"),
]
NoChap = Annotated[bool, typer.Option("--no-chap", help="turn CHAP off")]


def _stdin_line(value: str | None) -> str | None:
    return sys.stdin.readline().strip() if value == "-" else value


def chap_call(
    path: str,
    user: str | None,
    secret: str | None,
    reverse_user: str | None,
    reverse_secret: str | None,
    off: bool,
) -> Any:
    """The request that sets (or clears) CHAP at ``path``, or None when no option asks."""
    if off:
        return lambda c: c.delete(path)
    if user is None and secret is None and reverse_user is None and reverse_secret is None:
        return None
    body = {
        "user": user,
        "secret": _stdin_line(secret),
        "reverse_user": reverse_user,
        "reverse_secret": _stdin_line(reverse_secret),
    }
    return lambda c: c.put(path, body)


def show_chap(view: dict[str, Any]) -> None:
    c = view.get("chap")
    if not c:
        console.print(f"{view['target_kind']} {view['target']}: no CHAP")
        return
    mutual = f", mutual (target answers as {c['reverse_user']})" if c["mutual"] else ""
    console.print(f"{view['target_kind']} {view['target']}: CHAP as {c['user']}{mutual}")


@app.command("set")
def set_(
    name: str,
    data_dir: DataDirOption,
    chap_user: ChapUser = None,
    chap_secret: ChapSecret = None,
    chap_reverse_user: ChapReverseUser = None,
    chap_reverse_secret: ChapReverseSecret = None,
    no_chap: NoChap = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Set the CHAP credentials of a collection's devices (a device's own win)."""
    path = f"/collections/{name}/chap"
    call = chap_call(path, chap_user, chap_secret, chap_reverse_user, chap_reverse_secret, no_chap)
    run(data_dir, as_json, call or (lambda c: c.get(path)), show_chap)


@app.command()
def show(
    name: str,
    data_dir: DataDirOption,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Show a collection's CHAP name (never its secret)."""
    run(data_dir, as_json, lambda c: c.get(f"/collections/{name}/chap"), show_chap)


def show_collections(rows: list[dict[str, Any]]) -> None:
    table = [
        [
            c["name"],
            str(len(c["devices"])),
            ", ".join(v + (" (default)" if v == c["default"] else "") for v in c["vdisks"]) or "-",
            c["chap"]["user"] if c.get("chap") else "-",
        ]
        for c in rows
    ]
    print_rows(console, ("collection", "devices", "vdisks", "CHAP"), table, ids=("collection",))


@app.command("list")
def list_(
    data_dir: DataDirOption,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """List collections: their devices, vdisks and CHAP name."""
    run(data_dir, as_json, lambda c: c.get("/collections"), show_collections)


@app.command()
def create(
    name: str,
    data_dir: DataDirOption,
    device: Annotated[
        list[str] | None, typer.Option("--device", help="a device (MAC) to move into it; repeat")
    ] = None,
    vdisk: Annotated[str | None, typer.Option(help="a vdisk to assign to it")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Create a collection (or add to one): move devices into it and/or assign it a vdisk."""
    body = {"name": name, "devices": device or [], "vdisk": vdisk}
    run(data_dir, as_json, lambda c: c.post("/collections", body), lambda r: show_collections([r]))


@app.command()
def delete(
    name: str,
    data_dir: DataDirOption,
    release_devices: Annotated[
        bool,
        typer.Option(
            "--release-devices",
            help="its devices leave it (they stay registered, in no collection); without "
            "it a collection that has devices is not deleted",
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Delete a collection: its vdisks are unassigned (and, with --release-devices, its
    devices leave it)."""
    query = "?release_devices=true" if release_devices else ""

    def said(r: dict[str, Any]) -> None:
        console.print(
            f"deleted collection {r['name']}: {len(r['released'])} device(s) released, "
            f"vdisks unassigned: {', '.join(r['unassigned']) or '-'}"
        )

    run(data_dir, as_json, lambda c: c.delete(f"/collections/{quote(name)}{query}"), said)


@app.command()
def rename(
    name: str,
    to: str,
    data_dir: DataDirOption,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Rename a collection: its devices and vdisks move to the new name."""
    run(
        data_dir,
        as_json,
        lambda c: c.post(f"/collections/{quote(name)}/rename", {"to": to}),
        lambda r: show_collections([r]),
    )
