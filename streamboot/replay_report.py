"""Where a boot's time went: its recorded block accesses against a replay of them.

The original is what the log holds: when each access began (``t_ms`` since the session
started on its stream node), where and how much. It does not say how long each took: the
time between two accesses is the server's answer plus whatever the client did meanwhile
(its CPU, its own waits). The replay re-sends the same requests one at a time, so the sum of
their reply times (*server time*) is what serving the boot's blocks costs the stream node
today. Compared phase by phase with the original's elapsed time, it says whether a slow
boot waited for the server or for itself.

Pure functions over plain data (no I/O): ``streamboot replay blocks`` prints them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from streamboot.block_replay import ReplayResult, Request, percentile

# Server time below this share of the original's elapsed time: the client's doing; at or
# above SERVER_BOUND: the server's.
CLIENT_BOUND = 0.5
SERVER_BOUND = 0.8


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def original_summary(
    extents: Sequence[Sequence[Any]], requests: Sequence[Request]
) -> dict[str, Any]:
    first, last = int(extents[0][0]), int(extents[-1][0])
    return {
        "first_access_s": first / 1000,
        "span_s": (last - first) / 1000,
        "extents": len(extents),
        "requests": len(requests),
        "reads": sum(1 for x in requests if x.op == "r"),
        "writes": sum(1 for x in requests if x.op == "w"),
        "bytes_read": sum(x.length for x in requests if x.op == "r"),
        "bytes_written": sum(x.length for x in requests if x.op == "w"),
    }


def replay_summary(result: ReplayResult) -> dict[str, Any]:
    lat = result.latencies
    return {
        "span_s": round(result.span_s, 6),
        "connect_s": round(result.connect_s, 6),
        "requests": len(lat),
        "bytes_read": result.bytes_read,
        "bytes_written": result.bytes_written,
        "errors": result.errors,
        "error": result.error,
        "server_s": round(sum(lat), 6),
        "latency_ms": {
            "p50": _ms(percentile(lat, 50)) if lat else None,
            "p99": _ms(percentile(lat, 99)) if lat else None,
            "max": _ms(max(lat)) if lat else None,
        },
    }


def phases(
    original: Sequence[Request], replayed: Sequence[Request], latencies: Sequence[float], n: int
) -> list[dict[str, Any]]:
    """The original's span cut into ``n`` equal slices of time; per slice, what the original
    spent there (its length) against the replay's server time for the same requests."""
    t0, t1 = original[0].t_ms, original[-1].t_ms
    n = max(1, n) if t1 > t0 else 1
    width = (t1 - t0) / n
    out = [
        {
            "phase": i + 1,
            "from_s": round((t0 + i * width) / 1000, 6),
            "to_s": round((t0 + (i + 1) * width) / 1000, 6),
            "original_s": round(width / 1000, 6),
            "requests": 0,
            "bytes": 0,
            "server_s": 0.0,
        }
        for i in range(n)
    ]
    for req, lat in zip(replayed, latencies, strict=False):
        i = min(n - 1, int((req.t_ms - t0) / width)) if width else 0
        out[i]["requests"] += 1
        out[i]["bytes"] += req.length
        out[i]["server_s"] += lat
    for p in out:
        p["server_s"] = round(p["server_s"], 6)
        p["server_share"] = round(p["server_s"] / p["original_s"], 3) if p["original_s"] else None
    return out


def slowest(
    requests: Sequence[Request], latencies: Sequence[float], k: int
) -> list[dict[str, Any]]:
    ranked = sorted(range(len(latencies)), key=lambda i: latencies[i], reverse=True)[:k]
    return [
        {
            "op": requests[i].op,
            "offset": requests[i].offset,
            "length": requests[i].length,
            "latency_ms": _ms(latencies[i]),
            "original_at_s": requests[i].t_ms / 1000,
        }
        for i in ranked
    ]


def _s(seconds: float) -> str:
    return f"{seconds:.3f} s" if seconds < 10 else f"{seconds:.1f} s"


def _pct(share: float) -> str:
    return f"{share:.0%}" if share >= 0.01 else f"{share:.1%}"


def verdict(original: dict[str, Any], replay: dict[str, Any]) -> str:
    """One line: did the original boot wait for the server or for its client?"""
    if replay["requests"] < replay["planned"]:
        return (
            f"replay incomplete ({replay['requests']} of {replay['planned']} requests): "
            f"{replay['error'] or 'stopped'}"
        )
    server, span = float(replay["server_s"]), float(original["span_s"])
    if span <= 0:
        return (
            f"server time {_s(server)}; the original's accesses all began in the same "
            "millisecond, so there is no elapsed time to compare with"
        )
    share = server / span
    head = f"server time {_s(server)} of the original {_s(span)} ({_pct(share)})"
    if share < CLIENT_BOUND:
        return head + ": the time went to the client (its CPU, its own waits), not the server"
    if share < SERVER_BOUND:
        return head + ": the time is split between the server and the client"
    if share <= 1.0:
        return head + ": the time went to the server; the client mostly waited for blocks"
    return (
        head + ": serving the blocks one at a time now takes longer than the whole original; "
        "the server is slower now, or the original had several requests in flight"
    )


def build_report(
    extents: Sequence[Sequence[Any]],
    original: Sequence[Request],
    replayed: Sequence[Request],
    result: ReplayResult,
    *,
    n_phases: int = 10,
    n_slowest: int = 5,
) -> dict[str, Any]:
    """The comparison. ``original``: every request of the recorded ``extents``;
    ``replayed``: those sent (writes left out when the export is read-only); ``result``:
    how the replay went, request by request."""
    rep = replay_summary(result)
    rep["planned"] = len(replayed)
    rep["skipped_writes"] = len(original) - len(replayed)
    orig = original_summary(extents, original)
    return {
        "original": orig,
        "replay": rep,
        "phases": phases(original, replayed, result.latencies, n_phases),
        "slowest": slowest(replayed, result.latencies, n_slowest),
        "verdict": verdict(orig, rep),
    }
