"""The replay's arithmetic without a server: requests from extents, phases, the verdict."""

from __future__ import annotations

import pytest

from streamboot.block_replay import ReplayResult, parse_nbd_uri, split_extents
from streamboot.replay_report import build_report

KiB = 1024
# A 1 s boot: a burst of reads at 0 ms, a write at 500 ms, a read at 1000 ms.
EXTENTS = [[0, 0, 300 * KiB, "r"], [500, 1 << 20, 4 * KiB, "w"], [1000, 2 << 20, 64 * KiB, "r"]]


def result(latencies: list[float], error: str | None = None) -> ReplayResult:
    return ReplayResult(
        seconds=sum(latencies) + 0.001, connect_s=0.001, latencies=latencies,
        errors=1 if error else 0, error=error,
    )  # fmt: skip


def test_extents_split_into_requests_of_at_most_128_kib() -> None:
    reqs = split_extents(EXTENTS)
    assert [(r.t_ms, r.offset, r.length, r.op) for r in reqs] == [
        (0, 0, 128 * KiB, "r"), (0, 128 * KiB, 128 * KiB, "r"), (0, 256 * KiB, 44 * KiB, "r"),
        (500, 1 << 20, 4 * KiB, "w"), (1000, 2 << 20, 64 * KiB, "r"),
    ]  # fmt: skip


def test_nbd_uri() -> None:
    assert parse_nbd_uri("nbd://10.0.0.5:10810/tok-en_") == ("10.0.0.5", 10810, "tok-en_")
    assert parse_nbd_uri("nbd://[::1]/x") == ("::1", 10809, "x")
    with pytest.raises(ValueError, match="not an nbd"):
        parse_nbd_uri("http://h/s/x")


def test_phases_put_server_time_where_the_original_spent_its_time() -> None:
    reqs = split_extents(EXTENTS)
    report = build_report(EXTENTS, reqs, reqs, result([0.01, 0.01, 0.01, 0.2, 0.05]), n_phases=4)
    o, r = report["original"], report["replay"]
    assert (o["span_s"], o["requests"], o["extents"]) == (1.0, 5, 3)
    assert (o["bytes_read"], o["bytes_written"]) == (364 * KiB, 4 * KiB)
    assert r["server_s"] == pytest.approx(0.28) and r["planned"] == 5
    # 0 ms -> phase 1, 500 ms -> phase 3, the last access (1000 ms) -> the last phase.
    assert [p["requests"] for p in report["phases"]] == [3, 0, 1, 1]
    assert [p["server_s"] for p in report["phases"]] == pytest.approx([0.03, 0, 0.2, 0.05])
    assert report["phases"][2]["server_share"] == pytest.approx(0.8)
    assert [(s["op"], s["offset"]) for s in report["slowest"][:2]] == [
        ("w", 1 << 20),
        ("r", 2 << 20),
    ]
    assert report["verdict"].startswith("server time 0.280 s of the original 1.000 s (28%)")
    assert "went to the client" in report["verdict"]


@pytest.mark.parametrize(
    ("each", "says"),
    [
        (0.12, "split between the server and the client"),
        (0.19, "went to the server"),
        (0.5, "takes longer than the whole original"),
    ],
)
def test_verdict_by_server_share(each: float, says: str) -> None:
    reqs = split_extents(EXTENTS)
    assert says in build_report(EXTENTS, reqs, reqs, result([each] * 5))["verdict"]


def test_an_incomplete_replay_or_skipped_writes_are_said() -> None:
    reqs = split_extents(EXTENTS)
    broken = build_report(EXTENTS, reqs, reqs, result([0.01, 0.01], "ConnectionResetError: x"))
    assert broken["verdict"] == "replay incomplete (2 of 5 requests): ConnectionResetError: x"
    reads = [x for x in reqs if x.op == "r"]
    report = build_report(EXTENTS, reqs, reads, result([0.01] * 4))
    assert report["replay"]["skipped_writes"] == 1 and report["original"]["requests"] == 5
    assert report["verdict"].startswith("server time")
    one_ms = [[7, 0, 4096, "r"], [7, 4096 * 2, 4096, "r"]]
    same = build_report(one_ms, split_extents(one_ms), split_extents(one_ms), result([0.1, 0.1]))
    assert len(same["phases"]) == 1 and "same millisecond" in same["verdict"]
