"""A boot's trace read back from the span file (``DIR/traces.jsonl``, the jsonl exporter of
shared/telemetry.py): what ``streamboot trace show`` draws in the terminal and the
console's boot timeline draws in the browser, from the same spans."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

# Past this many bars a waterfall shows the first ones (a boot has a few dozen spans).
MAX_BARS = 400
# How much of the span file's end a trace is looked for in, read in CHUNK blocks: the
# file only grows (every span of every boot), a page view must not read all of it.
MAX_SCAN_BYTES = 256 << 20
CHUNK = 1 << 20
MAX_LINE = 1 << 20
# Spans kept per trace: a boot has a few dozen; a runaway trace does not grow the reader.
MAX_SPANS = 5000
# Spans are written as they end, in batches a few seconds late per process, and a boot's
# root span begins at its first DHCP packet: reading back stops this far before the
# earliest asked trace's known start.
SLACK_NS = 600 * 10**9
END_NS = re.compile(rb'"end_ns": ?(\d+)')


def boot_trace_id(opened: dict[str, Any], traceparent: str | None) -> str | None:
    """The trace id of a session's boot from its SessionOpened data: the boot's root (begun
    at its first DHCP packet); older logs: the event's own context (``traceparent``)."""
    parent = opened.get("boot_traceparent") or traceparent
    return parent.split("-")[1] if parent else None


def read_spans(path: Path, trace_id: str, since_ns: int | None = None) -> list[dict[str, Any]]:
    """One trace's spans in time order (:func:`read_traces`)."""
    return read_traces(path, [trace_id], since_ns)[trace_id]


def read_traces(
    path: Path,
    trace_ids: Iterable[str],
    since_ns: int | None = None,
    *,
    max_bytes: int = MAX_SCAN_BYTES,
) -> dict[str, list[dict[str, Any]]]:
    """Each trace's spans in time order, without the bus's reply-inbox spans (a request's
    answer travels on a ``_INBOX.…`` subject: plumbing, not a step of the boot).

    The file only grows and a boot's spans are among its last lines once it ran, so it is
    read from its end backwards, in one pass for every trace asked: at most ``max_bytes``,
    and no further back than spans that ended ``SLACK_NS`` before ``since_ns`` (when the
    traces began, if known). At most ``MAX_SPANS`` spans are kept per trace."""
    found: dict[str, list[dict[str, Any]]] = {t: [] for t in trace_ids}
    keys = [(t, t.encode()) for t in found]
    older_than = None if since_ns is None else since_ns - SLACK_NS
    for line in lines_backwards(path, max_bytes, older_than):
        for trace_id, key in keys:
            if key in line and len(found[trace_id]) < MAX_SPANS:
                try:
                    span = json.loads(line)
                except ValueError:  # a line being written, or not a span
                    break
                if isinstance(span, dict) and span.get("trace_id") == trace_id:
                    found[trace_id].append(span)
                break
    return {t: _without_inboxes(spans) for t, spans in found.items()}


def _without_inboxes(found: list[dict[str, Any]]) -> list[dict[str, Any]]:
    spans: list[dict[str, Any]] = []
    inbox_parent: dict[str, str | None] = {}
    for span in found:
        if is_inbox_span(span):
            inbox_parent[span["span_id"]] = span["parent_id"]
        else:
            spans.append(span)
    for span in spans:  # a span under a left-out one hangs from that one's parent
        for _ in range(20):
            if span["parent_id"] not in inbox_parent:
                break
            span["parent_id"] = inbox_parent[span["parent_id"]]
    return sorted(spans, key=lambda s: (s["start_ns"], s["end_ns"]))


def lines_backwards(path: Path, max_bytes: int, older_than_ns: int | None) -> Iterator[bytes]:
    """The file's lines, the last first, from its last ``max_bytes``; it stops at a block
    whose first whole line is a span that ended before ``older_than_ns``. A line longer
    than MAX_LINE (no span is) is skipped."""
    with open(path, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        floor = max(0, end - max_bytes)
        pos, rest = end, b""
        while pos > floor:
            size = min(CHUNK, pos - floor)
            pos -= size
            f.seek(pos)
            lines = (f.read(size) + rest).split(b"\n")
            # The block's first piece may be the end of a line that began before it.
            rest = lines[0] if len(lines[0]) <= MAX_LINE else b""
            yield from (line for line in reversed(lines[1:]) if line)
            if older_than_ns is not None and len(lines) > 2:
                ended = END_NS.search(lines[1])
                if ended and int(ended.group(1)) < older_than_ns:
                    return
        if floor == 0 and rest:
            yield rest


def is_inbox_span(span: dict[str, Any]) -> bool:
    return str(span.get("name", "")).startswith("_INBOX.")


def depth_of(spans: list[dict[str, Any]]) -> dict[str, int]:
    parent = {s["span_id"]: s["parent_id"] for s in spans}
    depth: dict[str, int] = {}
    for sid in parent:
        d, p = 0, parent[sid]
        while p in parent and d < 20:
            d, p = d + 1, parent[p]
        depth[sid] = d
    return depth


def bars(spans: list[dict[str, Any]], width: int = 1000) -> dict[str, Any]:
    """The waterfall as rows to draw: each span's depth, offset and length in seconds, and
    its bar's place on a ``width`` wide scale."""
    if not spans:
        return {"total_s": 0.0, "rows": []}
    start = min(s["start_ns"] for s in spans)
    total = max(max(s["end_ns"] for s in spans) - start, 1)
    depth = depth_of(spans)
    rows = [
        {
            "name": s["name"],
            "service": s.get("service") or "",
            "depth": depth[s["span_id"]],
            "start_s": (s["start_ns"] - start) / 1e9,
            "took_s": (s["end_ns"] - s["start_ns"]) / 1e9,
            "x": round((s["start_ns"] - start) / total * width, 1),
            "w": max(1.0, round((s["end_ns"] - s["start_ns"]) / total * width, 1)),
            "error": s.get("status") == "ERROR",
            "attributes": s.get("attributes") or {},
        }
        for s in spans[:MAX_BARS]
    ]
    return {"trace_id": spans[0]["trace_id"], "total_s": total / 1e9, "rows": rows}
