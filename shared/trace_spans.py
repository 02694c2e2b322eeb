"""A boot's trace read back from the span file (``DIR/traces.jsonl``, the jsonl exporter of
shared/telemetry.py): what ``streamboot trace show`` draws in the terminal and the
console's boot timeline draws in the browser, from the same spans."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Past this many bars a waterfall shows the first ones (a boot has a few dozen spans).
MAX_BARS = 400


def boot_trace_id(opened: dict[str, Any], traceparent: str | None) -> str | None:
    """The trace id of a session's boot from its SessionOpened data: the boot's root (begun
    at its first DHCP packet); older logs: the event's own context (``traceparent``)."""
    parent = opened.get("boot_traceparent") or traceparent
    return parent.split("-")[1] if parent else None


def read_spans(path: Path, trace_id: str) -> list[dict[str, Any]]:
    """The trace's spans in time order, without the bus's reply-inbox spans (a request's
    answer travels on a ``_INBOX.…`` subject: plumbing, not a step of the boot)."""
    spans: list[dict[str, Any]] = []
    inbox_parent: dict[str, str | None] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if trace_id in line:
                span = json.loads(line)
                if span["trace_id"] != trace_id:
                    continue
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
