"""`streamboot trace show SESSION|TOKEN|MAC`: a boot's trace as a waterfall in the terminal.

The embedded default writes spans as JSON lines (``DIR/traces.jsonl``); the session's
trace id comes from the ``traceparent`` its ``SessionOpened`` event was recorded with.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from shared.trace_spans import boot_trace_id, depth_of, read_spans
from streamboot.commands import DataDirOption, as_mac
from streamboot.commands.events import database_url

if TYPE_CHECKING:
    from shared.event_store import StoredEvent

app = typer.Typer(no_args_is_help=True, help="Read the traces of boots.")
BAR_WIDTH = 40


async def session_opened(url: str, ref: str) -> StoredEvent | None:
    """The SessionOpened a reference names: a session id, a session token (the log holds
    its SHA-256) or a MAC (its last boot's session)."""
    from shared.event_store import EventStore

    store = await EventStore.connect(url, max_size=1)
    try:
        mac = as_mac(ref)
        if mac is not None:
            rows = await store.read_all(0, 100_000, mac=mac, types=["SessionOpened"])
            return rows[-1] if rows else None
        rows = await store.read_all(0, 1, stream_id=f"session-{ref}", types=["SessionOpened"])
        if rows:
            return rows[0]
        return await store.session_opened(hashlib.sha256(ref.encode()).hexdigest())
    finally:
        await store.close()


def trace_id_of(opened: StoredEvent) -> str | None:
    return boot_trace_id(opened.data, opened.traceparent)


def waterfall(spans: list[dict[str, Any]]) -> Table:
    start = min(s["start_ns"] for s in spans)
    end = max(s["end_ns"] for s in spans)
    total = max(end - start, 1)
    depth = depth_of(spans)
    table = Table(title=f"trace {spans[0]['trace_id']}: {total / 1e9:.3f} s", title_justify="left")
    for col in ("span", "service", "start s", "took s", ""):
        table.add_column(col)
    for s in spans:
        left = int((s["start_ns"] - start) / total * BAR_WIDTH)
        width = max(1, int((s["end_ns"] - s["start_ns"]) / total * BAR_WIDTH))
        table.add_row(
            "  " * depth[s["span_id"]] + s["name"],
            s.get("service") or "",
            f"{(s['start_ns'] - start) / 1e9:.3f}",
            f"{(s['end_ns'] - s['start_ns']) / 1e9:.3f}",
            " " * left + "█" * width,
        )
    return table


@app.command()
def show(
    data_dir: DataDirOption,
    session: Annotated[
        str,
        typer.Argument(help="the session id, its token, or a MAC (its last boot)"),
    ],
    trace_file: Annotated[
        Path | None, typer.Option(help="span file (default DIR/traces.jsonl)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Draw the waterfall of one boot session's trace."""
    from shared.settings import Settings

    settings = Settings(data_dir=data_dir)
    opened = asyncio.run(session_opened(database_url(data_dir), session))
    if opened is None:
        typer.echo(f"error: no session {session!r} (by id, token or MAC) in the log", err=True)
        raise typer.Exit(2)
    trace_id = trace_id_of(opened)
    if trace_id is None:
        typer.echo(f"error: no trace recorded for session {opened.data['session_id']}", err=True)
        raise typer.Exit(2)
    path = trace_file or settings.trace_file or settings.data_path("traces.jsonl")
    if not path.exists():
        typer.echo(
            f"error: no span file at {path} (set STREAMBOOT_TRACE_EXPORTER=jsonl, or read the "
            f"trace {trace_id} in your OTLP backend)",
            err=True,
        )
        raise typer.Exit(2)
    # The file is read back to about the session's opening (its boot began shortly before).
    spans = read_spans(path, trace_id, int(opened.time.timestamp() * 1e9))
    if as_json:
        typer.echo(json.dumps(spans, indent=2))
        return
    if not spans:
        typer.echo(f"no spans of trace {trace_id} in {path} yet")
        raise typer.Exit(1)
    Console().print(waterfall(spans))
