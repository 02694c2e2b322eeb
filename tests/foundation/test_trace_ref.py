"""`trace show` takes what every other command prints: a session id, its token, or the MAC
(its last boot)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from shared.event_store import EventStore
from shared.events import SessionOpened, envelope
from streamboot.commands.trace import session_opened, trace_id_of

MAC = "52:54:00:00:0b:01"


def opened(sid: str, token: str, trace: str) -> SessionOpened:
    return SessionOpened(
        session_id=sid, mac=MAC, hostname="lab-001", machine_id="m", vdisk="demo", version=1,
        stream_node="n", write_cache="server-disk", write_cache_persistence="discard",
        token_hash=hashlib.sha256(token.encode()).hexdigest(),
        boot_traceparent=f"00-{trace}-{'1' * 16}-01",
    )  # fmt: skip


async def test_a_session_by_id_token_or_mac(database_url: str) -> None:
    store = await EventStore.connect(database_url)
    try:
        await store.append([envelope(opened("s-first", "tok-first", "a" * 32))])
        await store.append([envelope(opened("s-last", "tok-last", "b" * 32))])
    finally:
        await store.close()

    async def trace_of(ref: str) -> str | None:
        found = await session_opened(database_url, ref)
        return trace_id_of(found) if found else None

    assert await trace_of("s-first") == "a" * 32
    assert await trace_of("tok-first") == "a" * 32
    assert await trace_of("tok-last") == "b" * 32
    # A MAC, in any spelling: its last boot.
    assert await trace_of("52-54-00-00-0B-01") == "b" * 32
    assert await trace_of("no-such-thing") is None
    assert await trace_of("52:54:00:00:0b:99") is None


def test_trace_show_leaves_out_the_bus_reply_inbox_spans(tmp_path: Path) -> None:
    from shared.trace_spans import depth_of, read_spans

    trace = "ab" * 16
    lines = [
        {"trace_id": trace, "span_id": "1", "parent_id": None, "name": "boot pxe-001",
         "start_ns": 0, "end_ns": 10},
        {"trace_id": trace, "span_id": "2", "parent_id": "1", "name": "_INBOX.x7Yq.3 publish",
         "start_ns": 1, "end_ns": 2},
        {"trace_id": trace, "span_id": "3", "parent_id": "2", "name": "session open",
         "start_ns": 2, "end_ns": 3},
        {"trace_id": "cd" * 16, "span_id": "4", "parent_id": None, "name": "other",
         "start_ns": 0, "end_ns": 1},
    ]  # fmt: skip
    path = tmp_path / "traces.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    spans = read_spans(path, trace)
    assert [s["name"] for s in spans] == ["boot pxe-001", "session open"]
    # A span under a left-out one hangs from that one's parent.
    assert spans[1]["parent_id"] == "1"
    assert depth_of(spans) == {"1": 0, "3": 1}
