"""The ranges a session changed since its last acknowledged FLUSH (what is sent again to a
cache node that was away)."""

from __future__ import annotations

from services.stream.path.unflushed import MERGE_AT, Unflushed, merge


def test_runs_are_merged_and_ordered() -> None:
    u = Unflushed()
    for offset, length in [(8192, 4096), (0, 4096), (4096, 100), (20000, 10), (8000, 300)]:
        u.add(offset, length)
    u.add(50, 0)  # nothing changed
    assert u.runs() == [(0, 4196), (8000, 12288), (20000, 20010)]


def test_a_flush_takes_what_it_covers_and_gives_it_back_when_it_fails() -> None:
    u = Unflushed()
    u.add(0, 4096)
    covered = u.take()
    assert not u and covered == [(0, 4096)]
    u.add(4096, 4096)  # written while the FLUSH was out: not covered by it
    u.give_back(covered)  # the FLUSH failed
    assert u.runs() == [(0, 8192)]
    assert u.take() == [(0, 8192)] and u.runs() == []


def test_rewriting_the_same_blocks_without_a_flush_stays_bounded() -> None:
    u = Unflushed()
    for i in range(50 * MERGE_AT):
        u.add((i % 64) * 4096, 4096)
    assert len(u._ranges) <= MERGE_AT
    assert u.runs() == [(0, 64 * 4096)]


def test_merge_keeps_a_range_inside_another() -> None:
    assert merge([(0, 100), (10, 20), (100, 150)]) == [(0, 150)]
