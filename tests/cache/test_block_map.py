"""The block map of a write cache (shared/block_map.py), in process: the same
answers as one state byte per block in a bytearray, without paying for the whole disk."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from shared.block_map import (
    CLEAN,
    DIRTY,
    STATES,
    ZEROED,
    BlockMap,
    blocks_of,
    decode_runs,
    encode_runs,
)
from tests.cache.conftest import rss_mib


def reference_runs(ref: bytearray, first: int, stop: int) -> list[tuple[int, int, int]]:
    out: list[tuple[int, int, int]] = []
    for i in range(first, stop):
        if out and out[-1][0] == ref[i]:
            out[-1] = (ref[i], out[-1][1], i + 1)
        else:
            out.append((ref[i], i, i + 1))
    return out


@pytest.mark.parametrize("seed", range(40))
def test_answers_like_a_bytearray(seed: int, tmp_path: Path) -> None:
    rnd = random.Random(seed)
    n = rnd.choice([1, 7, 300, 5000, 70000])
    bm, ref = BlockMap(n), bytearray(n)
    for _ in range(rnd.randint(0, 40)):
        a = rnd.randrange(n)
        b = rnd.randint(a, min(n, a + rnd.choice([1, 3, 60, 9000])))
        v = rnd.choice(STATES)
        assert bm.set(a, b, v) == ref[a:b].count(CLEAN)
        ref[a:b] = bytes([v]) * (b - a)
    assert (bm.dirty, bm.zeroed) == (ref.count(DIRTY), ref.count(ZEROED))
    assert all(bm[i] == ref[i] for i in range(0, n, max(1, n // 500)))
    for _ in range(10):
        a = rnd.randrange(n)
        b = rnd.randint(a + 1, n)
        assert bm.runs(a, b) == reference_runs(ref, a, b)
        assert bm.count(DIRTY, a, b) == ref[a:b].count(DIRTY)
    nonclean = [r for r in reference_runs(ref, 0, n) if r[0] != CLEAN]
    assert bm.nonclean_runs() == nonclean
    assert decode_runs(bm.encode(), n) == nonclean

    # What the cache service writes to its map file, read back (holes skipped).
    path = tmp_path / "map"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        os.ftruncate(fd, n)
        for v, a, b in nonclean:
            os.pwrite(fd, bytes([v]) * (b - a), a)
        again = BlockMap(n)
        again.load_file(fd)
    finally:
        os.close(fd)
    assert again.nonclean_runs() == nonclean
    assert (again.dirty, again.zeroed) == (bm.dirty, bm.zeroed)


def test_a_clean_map_travels_as_nothing() -> None:
    bm = BlockMap(blocks_of(10 << 30))
    assert bm.clean and bm.encode() == "" and decode_runs("", len(bm)) == []
    bm.set(5, 6, DIRTY)
    bm.set(5, 6, CLEAN)
    assert bm.clean and bm.encode() == ""


@pytest.mark.parametrize(
    "encoded",
    [
        "not base64!",
        encode_runs([(DIRTY, 0, 10)])[:-8],  # truncated
        encode_runs([(DIRTY, 0, 200)]),  # beyond the 100 blocks of the disk
        encode_runs([(CLEAN, 0, 10)]),  # clean runs never travel
    ],
)
def test_a_bad_map_is_refused(encoded: str) -> None:
    with pytest.raises(ValueError):
        decode_runs(encoded, 100)


def test_maps_of_huge_disks_cost_memory_for_what_is_set() -> None:
    """Eight maps of 1 TiB disks would be 2 GiB as bytearrays; scanning them whole (as an
    attach does) must not make them resident either."""
    before = rss_mib(os.getpid())
    maps = [BlockMap(blocks_of(1 << 40)) for _ in range(8)]
    for m in maps:
        m.set(0, 16, DIRTY)
        m.set(len(m) - 16, len(m), ZEROED)
        assert m.nonclean_runs() == [(DIRTY, 0, 16), (ZEROED, len(m) - 16, len(m))]
    grown = rss_mib(os.getpid()) - before
    for m in maps:
        m.close()
    assert grown < 32, f"{grown:.0f} MiB resident for eight 1 TiB maps"


@pytest.mark.timeout(120)  # finding each run scanned to the map's end: hours for this one
def test_a_map_of_many_scattered_writes_is_listed_run_by_run() -> None:
    """A cache kept across boots gathers many small runs; opening it (``wc.open``) lists
    them all. Each run is found from where the last ended, not by listing every run to
    the end of the map and keeping the first (3,000 runs of a 100 GiB disk took 9 s)."""
    m = BlockMap(blocks_of(1 << 40))
    rng = random.Random(7)
    want = []
    for first in sorted(rng.sample(range(0, len(m), 2), 20_000)):
        state = rng.choice((DIRTY, ZEROED))
        m.set(first, first + 1, state)
        want.append((state, first, first + 1))
    runs = m.nonclean_runs()
    assert runs == want  # every other block at most: no two runs touch
    assert decode_runs(m.encode(), len(m)) == want
    m.close()
