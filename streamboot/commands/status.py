"""`streamboot status`: which services are alive, and where everything listens."""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from streamboot.commands import DataDirOption

if TYPE_CHECKING:
    from shared.settings import Settings

SERVICES = ("registry", "boot", "stream", "cache")
# Endpoint keys a service may advertise in its heartbeat (merged into `endpoints`).
ADVERTISED = ("nbd", "http_stream", "iscsi", "tftp", "dhcp", "boot_http", "api_url")


async def gather_status(settings: Settings) -> dict[str, Any]:
    from shared import bus
    from shared.heartbeat import read_heartbeats
    from shared.metrics import system_figures
    from shared.settings import RUNTIME_FILE, runtime_info, without_password
    from streamboot.embedded.datadir import supervisor_running

    runtime = runtime_info(settings.data_dir)
    nats_url = settings.nats_url or runtime.get("nats_url")
    database_url = settings.database_url or runtime.get("database_url")
    endpoints: dict[str, Any] = {
        "nats_url": nats_url and without_password(nats_url),
        "database_url": database_url and without_password(database_url),
        "api_url": runtime.get("api_url"),
    }
    status: dict[str, Any] = {
        "running": bool(runtime),
        "data_dir": str(settings.data_dir),
        "services": {
            name: {"alive": False, "version": None, "uptime_s": None} for name in SERVICES
        },
        "endpoints": endpoints,
        "instances": [],
    }
    if not nats_url:
        status["error"] = f"streamboot is not running here (no runtime.json in {settings.data_dir})"
        return status
    if runtime and not settings.nats_url and not supervisor_running(settings.data_dir):
        # Its `up` was killed (kill -9): the endpoints in runtime.json lead nowhere, and
        # asking them would only blame NATS for it.
        status["running"] = False
        status["endpoints"] = {}
        status["error"] = (
            f"`streamboot up` is not running on {settings.data_dir}: its {RUNTIME_FILE} is "
            f"stale (the `up` that wrote it is gone); start it again with "
            f"`streamboot up --data-dir {settings.data_dir}`"
        )
        return status
    try:
        nc = await bus.connect(
            nats_url,
            "streamboot-status",
            credentials=settings.nats_credentials("cli"),
            connect_timeout_s=2,
        )
    except bus.BusError as exc:
        status["error"] = str(exc)
        return status
    try:
        beats = await read_heartbeats(nc.jetstream(), settings.heartbeat_timeout_s)
    finally:
        await nc.close()
    status["figures"] = system_figures(beats)
    status["metrics"] = {
        f"{b['service']}@{b['node']}": b["metrics"]
        for b in beats
        if b["alive"] and b.get("metrics")
    }
    for beat in sorted(beats, key=lambda b: (b["service"], b["node"])):
        status["instances"].append(beat)
        summary = status["services"].setdefault(
            beat["service"], {"alive": False, "version": None, "uptime_s": None}
        )
        if beat["alive"]:
            summary.update(alive=True, version=beat["version"], uptime_s=beat["uptime_s"])
            summary["instances"] = summary.get("instances", 0) + 1
            for key in ADVERTISED:
                if beat.get(key) and not endpoints.get(key):
                    endpoints[key] = beat[key]
    return status


def status(
    data_dir: DataDirOption,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Each service alive or not (from heartbeats over NATS), and the endpoints."""
    from shared.settings import Settings

    settings = Settings(data_dir=data_dir)
    result = asyncio.run(gather_status(settings))
    healthy = all(s["alive"] for s in result["services"].values())
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=str))
    else:
        render(result)
    raise typer.Exit(0 if healthy else 1)


def render(result: dict[str, Any]) -> None:
    console = Console()
    if "error" in result:
        console.print(f"[red]{result['error']}[/red]")
    table = Table(title="services")
    for col in ("service", "alive", "version", "uptime", "instances", "load", "fds open/limit"):
        table.add_column(col)
    loads: dict[str, float] = {}
    fds: dict[str, str] = {}
    for beat in result["instances"]:
        if beat["alive"]:
            loads[beat["service"]] = loads.get(beat["service"], 0) + float(beat.get("load", 0))
            fds[beat["service"]] = fds_cell(beat, fds.get(beat["service"]))
    for name, s in result["services"].items():
        table.add_row(
            name,
            "[green]yes[/green]" if s["alive"] else "[red]no[/red]",
            s["version"] or "-",
            f"{s['uptime_s']:.0f}s" if s["uptime_s"] is not None else "-",
            str(s.get("instances", 0)),
            str(loads.get(name, "-")),
            fds.get(name, "-"),
        )
    console.print(table)
    ends = Table(title="endpoints")
    ends.add_column("endpoint")
    ends.add_column("address")
    for key, value in result["endpoints"].items():
        if value:
            ends.add_row(key, str(value))
    console.print(ends)
    figures = result.get("figures")
    if figures:
        ratio = figures.get("cache_hit_ratio")
        console.print(
            f"live sessions {figures['live_sessions']:.0f} · boots/min "
            f"{figures['boots_per_minute']} · streamed {figures['bytes_streamed'] / 2**20:,.1f} MiB"
            " (since the stream nodes started)"
            f" · cache hit ratio {'-' if ratio is None else f'{ratio:.1%}'} · write caches "
            f"{figures['write_cache_bytes'] / 2**20:,.1f} MiB"
        )
    stale = [b for b in result["instances"] if not b["alive"]]
    for beat in stale:
        age = time.time() - beat.get("at", 0)
        console.print(
            f"[yellow]{beat['service']} on {beat['node']}: last heartbeat {age:.0f}s ago[/yellow]"
        )
    for line in space_warnings(result["instances"]) + projection_warnings(result["instances"]):
        console.print(f"[yellow]{line}[/yellow]")


def fds_cell(beat: dict[str, Any], before: str | None) -> str:
    """``open/soft limit`` of an instance (shared/fd_limit.py; hard limit when the soft one is
    lower, refused connections when any); instances of one service side by side."""
    f = beat.get("fds")
    if not isinstance(f, dict):
        return before or "-"
    cell = f"{f.get('open')}/{f.get('soft')}"
    if f.get("hard") != f.get("soft"):
        cell += f" (hard {f.get('hard')})"
    if f.get("refused"):
        cell += f" [red]{f['refused']} refused[/red]"
    return f"{before}, {cell}" if before else cell


def projection_warnings(instances: list[dict[str, Any]]) -> list[str]:
    """A line per live registry whose projection skipped events it could not apply."""
    lines = []
    for beat in instances:
        errors = beat.get("projection_errors") or {}
        if beat["service"] != "registry" or not beat["alive"] or not errors.get("count"):
            continue
        last = errors.get("last") or {}
        lines.append(
            f"registry on {beat['node']}: {errors['count']} event(s) of the log skipped "
            f"(not applicable); last at position {last.get('position')} "
            f"({last.get('type')}): {last.get('error')}"
        )
    return lines


def space_warnings(instances: list[dict[str, Any]]) -> list[str]:
    """A line per live cache node short of space for a kind of write cache (its heartbeat's
    ``room``, services/cache/service.py): it takes no new ones while another node has room."""
    lines = []
    for beat in instances:
        if beat["service"] != "cache" or not beat["alive"]:
            continue
        free = beat.get("free_bytes") or {}
        for kind, ok in sorted((beat.get("room") or {}).items()):
            if not ok:
                lines.append(
                    f"cache on {beat['node']}: short of space for {kind} write caches "
                    f"({free.get(kind, 0) / 2**20:,.0f} MiB free); new ones go to other "
                    "cache nodes while one has room"
                )
    return lines
