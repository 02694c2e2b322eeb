"""`streamboot events list|tail`: read and follow the event log."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from streamboot.commands import DataDirOption, mac_argument

if TYPE_CHECKING:
    from shared.event_store import StoredEvent

app = typer.Typer(no_args_is_help=True, help="Read and follow the event log.")

StreamOpt = Annotated[str | None, typer.Option("--stream", help="only this stream id")]
TypeOpt = Annotated[str | None, typer.Option("--type", help="only this event type")]
MacOpt = Annotated[
    str | None,
    typer.Option(
        "--mac",
        help="only events about this MAC, its sessions' own included",
        callback=lambda v: mac_argument(v) if v else None,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="one JSON object per line")]


def database_url(data_dir) -> str:
    from shared.settings import Settings

    try:
        return Settings(data_dir=data_dir).require_database_url()
    except RuntimeError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def show(console: Console, e: StoredEvent, as_json: bool) -> None:
    if as_json:
        print(e.envelope().model_dump_json(), flush=True)
        return
    data = json.dumps(e.data, separators=(",", ":"))
    if len(data) > 120:
        data = data[:117] + "..."
    console.print(
        f"[dim]{e.position:>7}[/dim] {e.time:%H:%M:%S.%f}"[:-3]
        + f" [bold]{e.type}[/bold] [cyan]{e.stream_id}[/cyan]#{e.version} {data}",
        highlight=False,
        soft_wrap=True,
    )


async def _list(
    url: str,
    stream: str | None,
    type_: str | None,
    mac: str | None,
    after: int,
    limit: int,
    as_json: bool,
) -> int:
    from shared.event_store import EventStore

    store = await EventStore.connect(url, max_size=1)
    types = [type_] if type_ else None
    try:
        if mac:
            rows = [
                e
                for e in await store.read_device(mac, after, limit, types=types)
                if stream is None or e.stream_id == stream
            ]
        else:
            rows = await store.read_all(after, limit, types=types, stream_id=stream)
    finally:
        await store.close()
    console = Console()
    for row in rows:
        show(console, row, as_json)
    return len(rows)


@app.command("list")
def list_(
    data_dir: DataDirOption,
    stream: StreamOpt = None,
    type_: TypeOpt = None,
    mac: MacOpt = None,
    after: Annotated[int, typer.Option(help="start after this global position")] = 0,
    limit: Annotated[int, typer.Option(help="at most this many events")] = 1000,
    as_json: JsonOpt = False,
) -> None:
    """Events in global order, optionally filtered."""
    asyncio.run(_list(database_url(data_dir), stream, type_, mac, after, limit, as_json))


async def _tail(
    url: str, stream: str | None, type_: str | None, mac: str | None, last: int, as_json: bool
) -> None:
    from shared.event_store import EventStore

    store = await EventStore.connect(url, max_size=2)
    console = Console()
    try:
        start = max(0, await store.last_position() - last)
        filters = {
            k: v for k, v in {"stream_id": stream, "types": [type_] if type_ else None}.items() if v
        }
        # A MAC's sessions' own events do not carry the MAC: follow the sessions it opens.
        sessions = (
            {e.data["session_id"] for e in await store.read_device(mac, types=["SessionOpened"])}
            if mac
            else set()
        )
        async for row in store.follow(start, **filters):
            if mac:
                if row.type == "SessionOpened" and row.data.get("mac") == mac:
                    sessions.add(row.data["session_id"])
                if row.data.get("mac") != mac and row.data.get("session_id") not in sessions:
                    continue
            show(console, row, as_json)
    finally:
        await store.close()


@app.command()
def tail(
    data_dir: DataDirOption,
    stream: StreamOpt = None,
    type_: TypeOpt = None,
    mac: MacOpt = None,
    last: Annotated[int, typer.Option(help="show this many past events first")] = 10,
    as_json: JsonOpt = False,
) -> None:
    """Follow the log live (Ctrl-C to stop)."""
    try:
        asyncio.run(_tail(database_url(data_dir), stream, type_, mac, last, as_json))
    except KeyboardInterrupt:
        pass


async def _replay(url: str, mac: str, since: datetime | None, as_json: bool) -> int:
    from shared.event_store import EventStore
    from streamboot.timeline import device_timelines

    store = await EventStore.connect(url, max_size=2)
    try:
        boots = await device_timelines(store, mac, since)
    finally:
        await store.close()
    if as_json:
        print(json.dumps([b.to_json() for b in boots], indent=2))
        return len(boots)
    console = Console()
    if not boots:
        console.print(f"no boots of {mac} in the log")
    for n, boot in enumerate(boots, 1):
        table = Table(
            title=f"boot {n} of {mac}: {boot.started:%Y-%m-%d %H:%M:%S} UTC, "
            f"{boot.duration_s:.1f} s, {boot.bytes_read:,} B read, {boot.bytes_written:,} B written"
            + (f" (session {boot.session_id})" if boot.session_id else " (no session)"),
            title_justify="left",
        )
        table.add_column("+s", no_wrap=True)
        table.add_column("step took", no_wrap=True)
        table.add_column("phase", no_wrap=True)
        table.add_column("event", no_wrap=True)
        table.add_column("detail")
        for step in boot.steps:
            table.add_row(
                f"{step.since_start_s:7.3f}",
                f"{step.since_previous_s:7.3f}",
                step.phase or "-",
                step.type,
                step.detail,
            )
        console.print(table)
        console.print(f"  phase: [bold]{boot.phase or '-'}[/bold]", highlight=False)
        for problem in boot.problems:
            console.print(f"  [red]problem:[/red] {problem}", highlight=False)
    return len(boots)


@app.command()
def replay(
    data_dir: DataDirOption,
    device: Annotated[
        str, typer.Option("--device", help="the device's MAC", callback=mac_argument)
    ],
    since: Annotated[
        datetime | None, typer.Option(help="only boots from this time on (UTC, ISO 8601)")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """A device's boots as timelines: each step, the time it took and the boot's phase."""
    mac = device
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    asyncio.run(_replay(database_url(data_dir), mac, since, as_json))
