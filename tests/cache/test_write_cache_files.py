"""The cache service's write-cache files: made ahead of the first write, told apart from it.

In process (no NATS): what a cache node does between an open and the first write."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from services.cache.write_cache import SessionWriteCache, WriteCaches
from shared.block_map import decode_runs
from shared.contracts.cache import wire
from shared.contracts.cache.bodies import WcOpen

SIZE = 64 << 20


def caches(tmp_path: Path, changed: list[str]) -> WriteCaches:
    return WriteCaches(
        tmp_path / "disk",
        tmp_path / "ram",
        capacity=1 << 30,
        on_full=lambda wc: None,
        on_first_change=lambda wc: changed.append(wc.key),
    )


def open_request(key: str) -> WcOpen:
    return WcOpen(key=key, session_id=key, vdisk="d", version=1, size=SIZE,
                  kind="server-disk", persistence="discard")  # fmt: skip


def write(offset: int, data: bytes) -> tuple[int, int, int, int, memoryview]:
    return (wire.OP_WRITE, 0, offset, len(data), memoryview(data))


async def test_files_are_made_ahead_and_the_first_write_is_still_the_first_change(
    tmp_path: Path,
) -> None:
    changed: list[str] = []
    wcs = caches(tmp_path, changed)
    wcs.recover()
    wc = wcs.open(open_request("s1"))
    assert not any(p.exists() for p in wc.paths())  # the open itself makes nothing
    assert wc.state.encode() == ""  # a clean map travels as nothing

    wcs.prepare("s1")
    assert all(p.exists() for p in wc.paths())
    assert os.fstat(wc.data_fd).st_size == SIZE
    assert wc.state.encode() == "" and wc.used == 0 and not wc.changed
    assert changed == []  # files are not data: the owner record is not marked written
    wc.sync()  # nothing written: nothing to make durable, and no error

    assert await wcs.apply("s1", [write(8192, b"a" * 4096)]) == b"\0"
    assert await wcs.apply("s1", [write(0, b"b" * 4096)]) == b"\0"
    assert changed == ["s1"]  # once, at the first change
    assert wc.read(8192, 4096) == b"a" * 4096 and wc.read(4096, 4096) == bytes(4096)
    assert decode_runs(wc.state.encode(), len(wc.state)) == [(1, 0, 1), (1, 2, 3)]

    # A node restart finds it with its blocks.
    wc.close()
    again = caches(tmp_path, [])
    assert again.recover() == 1
    assert again.caches["s1"].read(0, 4096) == b"b" * 4096 and again.caches["s1"].changed
    assert again.caches["s1"].state.nonclean_runs() == [(1, 0, 1), (1, 2, 3)]


async def test_files_that_cannot_be_made_ahead_are_an_error_at_the_first_write(
    tmp_path: Path,
) -> None:
    wcs = caches(tmp_path, [])
    wcs.recover()
    wc: SessionWriteCache = wcs.open(open_request("s2"))
    (tmp_path / "disk").rmdir()  # the cache directory is gone (a lost mount...)
    wcs.prepare("s2")  # logged, nothing half-open left behind
    assert wc.data_fd == -1 and wc.map_fd == -1
    assert await wcs.apply("s2", [write(0, b"c" * 4096)]) == bytes([errno.ENOENT])
    (tmp_path / "disk").mkdir()
    assert await wcs.apply("s2", [write(0, b"c" * 4096)]) == b"\0"  # and it can recover
    assert wc.read(0, 4096) == b"c" * 4096


def test_preparing_a_cache_that_is_gone_or_made_does_nothing(tmp_path: Path) -> None:
    wcs = caches(tmp_path, [])
    wcs.recover()
    wcs.prepare("never-opened")
    wc = wcs.open(open_request("s3"))
    wcs.prepare("s3")
    fd = wc.data_fd
    wcs.prepare("s3")
    assert wc.data_fd == fd
