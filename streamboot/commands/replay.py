"""`streamboot replay blocks SESSION`: re-drive a past boot's block accesses against a live
stream node and say where the boot's time went (docs/stream.md, "Replaying a boot").

The recorded accesses are read from the log (the session's ``BlocksRequested``); the
registry opens a *replay session* on the same vdisk version (``ReplaySessionOpened``: not a
boot of the device, writes into a discarded write cache); the accesses are replayed over
NBD one at a time; the replay session is closed; the report compares the two.
"""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from streamboot.block_replay import ReplayResult, Request, parse_nbd_uri, replay, split_extents
from streamboot.commands import DataDirOption
from streamboot.commands.events import database_url
from streamboot.registry_api import (
    EXIT_UNREACHABLE,
    ClientError,
    RegistryClient,
    cli_errors,
)
from streamboot.replay_report import build_report

app = typer.Typer(no_args_is_help=True, help="Re-drive a past boot against the live system.")

# A request of a replay that gets no reply in this long ends the replay (a hung node).
REQUEST_TIMEOUT_S = 60.0


class Pace(StrEnum):
    fast = "fast"
    recorded = "recorded"


async def recorded_accesses(url: str, session_id: str) -> tuple[dict[str, Any], list[list[Any]]]:
    """The session's SessionOpened data and its block accesses in time order."""
    import asyncpg

    from shared.event_store import EventStore

    try:
        store = await EventStore.connect(url, max_size=1)
    except (OSError, asyncpg.PostgresError) as exc:
        raise ClientError(
            f"the event log at {url} is not reachable ({exc})", "unreachable", EXIT_UNREACHABLE
        ) from None
    try:
        events = await store.read_stream(f"session-{session_id}")
    finally:
        await store.close()
    opened = next((e.data for e in events if e.type == "SessionOpened"), None)
    if opened is None:
        replayed = next((e.data for e in events if e.type == "ReplaySessionOpened"), None)
        if replayed is not None:
            raise ClientError(
                f"session {session_id} is a replay of {replayed['replay_of']}, not a boot: "
                "replay that session",
                "invalid",
            )
        raise ClientError(f"unknown session {session_id}", "not_found")
    # Batches are in log order; within a session the node's clock only moves forward, and
    # a stable sort keeps the order of accesses that began in the same millisecond.
    extents = sorted(
        (list(x) for e in events if e.type == "BlocksRequested" for x in e.data["extents"]),
        key=lambda x: x[0],
    )
    if not extents:
        raise ClientError(
            f"session {session_id} recorded no block accesses (no BlocksRequested in the "
            "log): nothing to replay",
            "not_found",
        )
    return opened, extents


def close_replay_session(client: RegistryClient, session_id: str) -> bool:
    try:
        client.delete(f"/sessions/{session_id}?reason=replay-finished")
    except ClientError as exc:
        print(
            f"warning: the replay session {session_id} was not closed ({exc}); the registry "
            "closes it after its idle timeout",
            file=sys.stderr,
        )
        return False
    return True


def writes_statement(original: list[Request], replayed: list[Request], write_cache: str) -> str:
    n = sum(1 for x in original if x.op == "w")
    if not n:
        return "the original wrote nothing"
    writes = f"{n} write{'s' if n > 1 else ''}"
    if len(replayed) < len(original):
        return (
            f"{writes} skipped: the original's write cache is on the client "
            f"({write_cache}), so its writes never reached the server"
        )
    return (
        f"{writes} replayed into a throwaway {write_cache} write cache, dropped when "
        "the replay session closed (the vdisk itself is never written)"
    )


@app.command()
def blocks(
    session: Annotated[
        str, typer.Argument(metavar="SESSION", help="the id of the session to replay")
    ],
    data_dir: DataDirOption,
    stream: Annotated[
        str | None,
        typer.Option(
            "--stream",
            metavar="NODE",
            help="stream node to replay on (default: the original's if alive, else any live one)",
        ),
    ] = None,
    pace: Annotated[
        Pace,
        typer.Option(help="fast: back to back; recorded: each request at its recorded time"),
    ] = Pace.fast,
    phases: Annotated[
        int, typer.Option(min=1, help="slices of the original's timeline to compare")
    ] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
) -> None:
    """Re-drive a past session's block accesses against a live stream node and report
    where the boot's time went: the server, or the client."""
    import uvloop

    url = database_url(data_dir)
    with cli_errors(as_json):
        opened, extents = uvloop.run(recorded_accesses(url, session))
        client = RegistryClient.from_data_dir(data_dir)
        rs = client.post("/sessions/replay", {"session_id": session, "stream_node": stream})
    original = split_extents(extents)
    # A read-only export (client-side write cache) takes no writes: the original's never
    # reached the server either.
    replayed = [x for x in original if x.op == "r"] if rs["read_only"] else original
    try:
        host, port, name = parse_nbd_uri(rs["nbd_uri"])
        result: ReplayResult = uvloop.run(
            replay(host, port, name, replayed, pace == Pace.recorded, REQUEST_TIMEOUT_S)
        )
    finally:
        closed = close_replay_session(client, rs["session_id"])
    report = {
        "session_id": session,
        "replay_session_id": rs["session_id"],
        "replay_closed": closed,
        "mac": opened["mac"],
        "hostname": opened["hostname"],
        "vdisk": opened["vdisk"],
        "version": opened["version"],
        "original_stream_node": opened.get("stream_node") or None,
        "stream_node": rs["stream_node"],
        "pace": pace.value,
        "writes": writes_statement(original, replayed, rs["write_cache"]),
        **build_report(extents, original, replayed, result, n_phases=phases),
    }
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        render(report)
    if result.errors:
        print(f"error: the replay failed: {result.error}", file=sys.stderr)
        raise typer.Exit(1)


def _bytes(n: int) -> str:
    if n < 2**20:
        return f"{n:,} B ({n / 2**10:,.1f} KiB)"
    return f"{n:,} B ({n / 2**20:,.1f} MiB)"


def render(r: dict[str, Any]) -> None:
    console = Console(soft_wrap=True, highlight=False)
    o, p = r["original"], r["replay"]
    console.print(
        f"replay of session {r['session_id']}: {r['mac']} ({r['hostname']}), "
        f"{r['vdisk']} v{r['version']}, on stream node {r['stream_node'] or '-'} "
        f"(original: {r['original_stream_node'] or '-'}), pace {r['pace']}"
    )
    table = Table("", "original", "replay", title_justify="left")
    table.add_row(
        "span", f"{o['span_s']:.3f} s (first access at {o['first_access_s']:.3f} s)",
        f"{p['span_s']:.3f} s (connect {p['connect_s'] * 1000:.1f} ms)",
    )  # fmt: skip
    table.add_row("requests", f"{o['requests']:,} ({o['extents']:,} extents)", f"{p['requests']:,}")
    table.add_row("bytes read", _bytes(o["bytes_read"]), _bytes(p["bytes_read"]))
    table.add_row("bytes written", _bytes(o["bytes_written"]), _bytes(p["bytes_written"]))
    table.add_row("server time", "-", f"{p['server_s']:.3f} s")
    table.add_row("errors", "-", str(p["errors"]) + (f" ({p['error']})" if p["error"] else ""))
    console.print(table)

    ph = Table(
        "phase", "original s", "elapsed s", "requests", "MiB", "server s", "server share",
        title="where the time went: the original's timeline in equal slices",
        title_justify="left",
    )  # fmt: skip
    for x in r["phases"]:
        share = x["server_share"]
        ph.add_row(
            str(x["phase"]), f"{x['from_s']:.3f}-{x['to_s']:.3f}", f"{x['original_s']:.3f}",
            f"{x['requests']:,}", f"{x['bytes'] / 2**20:.1f}", f"{x['server_s']:.3f}",
            "-" if share is None else f"{share:.0%} " + "█" * min(20, round(share * 20)),
        )  # fmt: skip
    console.print(ph)
    lat = p["latency_ms"]
    if lat["p50"] is not None:
        console.print(
            f"request latency: p50 {lat['p50']:.3f} ms, p99 {lat['p99']:.3f} ms, "
            f"max {lat['max']:.3f} ms"
        )
    if r["slowest"]:
        slow = Table(
            "op", "offset", "length", "latency ms", "original at s",
            title="slowest requests", title_justify="left",
        )  # fmt: skip
        for x in r["slowest"]:
            slow.add_row(
                x["op"], f"{x['offset']:,}", f"{x['length']:,}", f"{x['latency_ms']:.3f}",
                f"{x['original_at_s']:.3f}",
            )  # fmt: skip
        console.print(slow)
    console.print(f"writes: {r['writes']}")
    console.print(f"[bold]verdict:[/bold] {r['verdict']}")
