"""The cache service's write-cache files: made ahead of the first write, told apart from it,
and their descriptors held only while a cache is in use.

In process (no NATS): what a cache node does between an open and the first write, and
with a cache that goes idle."""

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
    assert wc.paths()[0].stat().st_size == SIZE
    assert wc.data_fd == -1 and wc.map_fd == -1  # made, and closed again until used
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
    inode = wc.paths()[0].stat().st_ino
    wcs.prepare("s3")
    assert wc.paths()[0].stat().st_ino == inode and wc.data_fd == -1


def held(directory: Path) -> int:
    """This process's descriptors open on files in ``directory``."""
    fds = Path("/proc/self/fd")
    n = 0
    for fd in fds.iterdir():
        try:
            n += Path(os.readlink(fd)).parent == directory
        except OSError:
            continue  # closed meanwhile (the listing's own descriptor)
    return n


async def test_idle_caches_hold_no_descriptors(tmp_path: Path) -> None:
    """Many sessions open, their files made, nothing written: no descriptor held. A read
    of blocks never written opens nothing either; the first write opens the two files."""
    wcs = caches(tmp_path, [])
    wcs.recover()
    for i in range(50):
        wcs.open(open_request(f"idle{i}"))
        wcs.prepare(f"idle{i}")
    assert all(wcs.caches[f"idle{i}"].paths()[0].exists() for i in range(50))
    assert held(tmp_path / "disk") == 0
    wc = wcs.caches["idle7"]
    assert wc.read(0, 1 << 20) == bytes(1 << 20)
    assert held(tmp_path / "disk") == 0
    assert await wcs.apply("idle7", [write(4096, b"w" * 4096)]) == b"\0"
    assert held(tmp_path / "disk") == 2
    assert wc.read(0, 8192) == bytes(4096) + b"w" * 4096
    wcs.close()


async def test_an_idle_cache_closes_its_files_only_once_fsynced(tmp_path: Path) -> None:
    """close_idle closes a cache unused for that long, but not while a change is not
    fsynced yet; reads, writes and FLUSHes after it reopen the files, nothing lost."""
    wcs = caches(tmp_path, [])
    wcs.recover()
    wc = wcs.open(open_request("s4"))
    assert await wcs.apply("s4", [write(0, b"a" * 4096)]) == b"\0"
    assert wcs.close_idle(0) == 1 and wc.data_fd >= 0  # written, not fsynced: kept open
    assert await wcs.apply("s4", [(wire.OP_FLUSH, 0, 0, 0, b"")]) == b"\0"
    assert wc.synced == wc.changes
    assert wcs.close_idle(3600) == 1  # fsynced, but not idle that long
    assert wcs.close_idle(0) == 0 and wc.data_fd == -1 and held(tmp_path / "disk") == 0

    assert wc.read(0, 4096) == b"a" * 4096  # a read of what it holds reopens them
    assert wcs.close_idle(0) == 0
    zero = (wire.OP_ZERO, 0, 0, 4096, None)
    assert await wcs.apply("s4", [write(8192, b"b" * 4096), zero]) == b"\0\0"
    assert await wcs.apply("s4", [(wire.OP_FLUSH, 0, 0, 0, b"")]) == b"\0"
    assert wcs.close_idle(0) == 0
    assert wc.read(0, 12288) == bytes(8192) + b"b" * 4096
    wcs.close()

    again = caches(tmp_path, [])
    assert again.recover() == 1
    back = again.caches["s4"]
    assert back.data_fd == -1 and held(tmp_path / "disk") == 0  # recovered closed
    assert back.read(0, 12288) == bytes(8192) + b"b" * 4096
    assert decode_runs(back.state.encode(), len(back.state)) == [(2, 0, 1), (1, 2, 3)]
    # Recovered: unknown whether its last changes were fsynced, so it stays open until an
    # fsync says they are.
    assert again.close_idle(0) == 1
    await back.durable()
    assert again.close_idle(0) == 0
    again.close()


async def test_files_gone_while_closed_fail_the_write_not_the_service(tmp_path: Path) -> None:
    wcs = caches(tmp_path, [])
    wcs.recover()
    wc = wcs.open(open_request("s5"))
    wcs.prepare("s5")
    for p in wc.paths():
        p.unlink()  # lost under the closed cache (a wiped directory...)
    assert await wcs.apply("s5", [write(0, b"c" * 4096)]) == bytes([errno.ENOENT])
    assert wc.data_fd == -1 and wc.map_fd == -1 and not wc.changed
    wc.sync()  # nothing changed: nothing to fsync, no error
    wcs.close()
