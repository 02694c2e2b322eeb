"""The span file is read from its end backwards (shared/trace_spans.py): a boot's trace is
found whole across blocks, a line being written or not a span is skipped, and a page view
reads the file's tail, not all of it — bounded by bytes and by the boot's start."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from shared import trace_spans
from shared.trace_spans import SLACK_NS, read_spans, read_traces

T, U = "ab" * 16, "cd" * 16
S = 10**9


def span(trace: str, n: int, start_ns: int, name: str = "step") -> dict[str, Any]:
    return {
        "trace_id": trace, "span_id": f"{n:016x}", "parent_id": None, "name": f"{name} {n}",
        "service": "boot", "start_ns": start_ns, "end_ns": start_ns + 1000,
        "attributes": {"mac": "52:54:00:00:00:01"}, "status": "UNSET",
    }  # fmt: skip


def write(path: Path, spans: list[dict[str, Any]], tail: str = "") -> None:
    path.write_text("".join(json.dumps(s) + "\n" for s in spans) + tail)


def bytes_read() -> int:
    """What this process has read so far (the kernel's count)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def test_a_trace_is_found_whole_across_blocks(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(trace_spans, "CHUNK", 97)  # many blocks, lines cut at every place
    mixed = [span(T if n % 3 == 0 else U, n, n * S) for n in range(300)]
    path = tmp_path / "traces.jsonl"
    write(path, mixed, tail='{"trace_id": "' + T + '", "span_id": "ff", "na')  # being written
    found = read_traces(path, [T, U, "ee" * 16])
    assert [s["span_id"] for s in found[T]] == [s["span_id"] for s in mixed if s["trace_id"] == T]
    assert len(found[U]) == 200 and found["ee" * 16] == []
    assert read_spans(path, T) == found[T]


def test_garbage_lines_are_skipped_and_spans_per_trace_are_capped(
    tmp_path: Path, monkeypatch: Any
) -> None:
    monkeypatch.setattr(trace_spans, "MAX_SPANS", 10)
    path = tmp_path / "traces.jsonl"
    write(path, [span(T, n, n * S) for n in range(50)], tail=f"not json {T}\n[1, 2]\n")
    assert len(read_spans(path, T)) == 10


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs /proc/self/io")
def test_a_view_reads_the_tail_not_the_whole_file(tmp_path: Path) -> None:
    boot_start = 10_000 * S
    # An hour of older boots' spans, written as the exporter does (one line each).
    pre, post = json.dumps(span(U, 0, 0)).split('"start_ns": 0, "end_ns": 1000')
    first = boot_start - SLACK_NS - 3600 * S
    old = "".join(
        f'{pre}"start_ns": {first + n}, "end_ns": {first + n + 1000}{post}\n'
        for n in range(150_000)
    )
    path = tmp_path / "traces.jsonl"
    path.write_text(old)
    with path.open("a") as f:
        f.write("".join(json.dumps(span(T, n, boot_start + n * S)) + "\n" for n in range(30)))
    size = path.stat().st_size
    assert size > 32 << 20

    # Known when the boot began: read back to a little before it.
    before = bytes_read()
    assert len(read_spans(path, T, boot_start)) == 30
    assert bytes_read() - before < 4 << 20, f"read {bytes_read() - before} of {size} bytes"

    # Not known: no more than the bound.
    before = bytes_read()
    found = read_traces(path, [T, U], max_bytes=8 << 20)
    assert bytes_read() - before <= 9 << 20
    assert len(found[T]) == 30 and 0 < len(found[U]) < 150_000
