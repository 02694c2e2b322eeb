"""`streamboot trace show SESSION`: a boot's trace as a waterfall in the terminal.

The embedded default writes spans as JSON lines (``DIR/traces.jsonl``); the session's
trace id comes from the ``traceparent`` its ``SessionOpened`` event was recorded with.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from shared.event_store import EventStore
from shared.settings import Settings
from streamboot.commands import DataDirOption
from streamboot.commands.events import database_url

app = typer.Typer(no_args_is_help=True, help="Read the traces of boots.")
BAR_WIDTH = 40


async def session_trace_id(url: str, session: str) -> str | None:
    store = await EventStore.connect(url, max_size=1)
    try:
        rows = await store.read_all(0, 10, stream_id=f"session-{session}", types=["SessionOpened"])
    finally:
        await store.close()
    if not rows:
        return None
    # The boot's root (begun at its first DHCP packet); older logs: the event's own context.
    traceparent = rows[0].data.get("boot_traceparent") or rows[0].traceparent
    return traceparent.split("-")[1] if traceparent else None


def read_spans(path: Path, trace_id: str) -> list[dict[str, Any]]:
    spans = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if trace_id in line:
                span = json.loads(line)
                if span["trace_id"] == trace_id:
                    spans.append(span)
    return sorted(spans, key=lambda s: (s["start_ns"], s["end_ns"]))


def depth_of(spans: list[dict[str, Any]]) -> dict[str, int]:
    parent = {s["span_id"]: s["parent_id"] for s in spans}
    depth: dict[str, int] = {}
    for sid in parent:
        d, p = 0, parent[sid]
        while p in parent and d < 20:
            d, p = d + 1, parent[p]
        depth[sid] = d
    return depth


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
    session: Annotated[str, typer.Argument(help="the session id")],
    trace_file: Annotated[
        Path | None, typer.Option(help="span file (default DIR/traces.jsonl)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Draw the waterfall of one boot session's trace."""
    settings = Settings(data_dir=data_dir)
    trace_id = asyncio.run(session_trace_id(database_url(data_dir), session))
    if trace_id is None:
        typer.echo(f"error: no trace recorded for session {session}", err=True)
        raise typer.Exit(2)
    path = trace_file or settings.trace_file or settings.data_path("traces.jsonl")
    if not path.exists():
        typer.echo(
            f"error: no span file at {path} (set STREAMBOOT_TRACE_EXPORTER=jsonl, or read the "
            f"trace {trace_id} in your OTLP backend)",
            err=True,
        )
        raise typer.Exit(2)
    spans = read_spans(path, trace_id)
    if as_json:
        typer.echo(json.dumps(spans, indent=2))
        return
    if not spans:
        typer.echo(f"no spans of trace {trace_id} in {path} yet")
        raise typer.Exit(1)
    Console().print(waterfall(spans))
