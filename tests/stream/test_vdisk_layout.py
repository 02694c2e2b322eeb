"""The version chain format (shared.vdisk_layout) and the write cache layer, on real files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.stream.path.backend import STATE_HOLE, STATE_ZERO
from services.stream.path.chain import ChainBackend
from services.stream.path.write_cache import WriteCache
from shared.vdisk_layout import ZERO_FD, LayoutError, open_chain, write_delta

BS = 64 * 1024


def make(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_base_only_resolves_to_one_piece(tmp_path: Path) -> None:
    base = make(tmp_path / "base.raw", os.urandom(3 * BS + 100))
    with open_chain([base]) as chain:
        assert chain.size == 3 * BS + 100
        (piece,) = chain.resolve(BS + 5, 1000)
        assert piece[1:] == (BS + 5, 1000)
        assert chain.pread(0, chain.size) == base.read_bytes()
        with pytest.raises(ValueError):
            chain.resolve(chain.size - 1, 2)


def test_delta_stores_only_changed_blocks(tmp_path: Path) -> None:
    v1 = os.urandom(8 * BS)
    base = make(tmp_path / "base.raw", v1)
    v2 = bytearray(v1)
    v2[10] ^= 0xFF  # block 0
    v2[5 * BS : 6 * BS] = bytes(BS)  # block 5, zeroed
    new = make(tmp_path / "v2-full.raw", bytes(v2))
    assert write_delta([base], new, tmp_path / "v2") == 2
    data_file = tmp_path / "v2.data"
    assert data_file.stat().st_blocks * 512 <= BS + 4096  # sparse: block 0 only
    with open_chain([base, tmp_path / "v2.map"]) as chain:
        assert chain.pread(0, chain.size) == bytes(v2)
        pieces = chain.resolve(0, 8 * BS)
        assert [n for _, _, n in pieces] == [BS, 4 * BS, BS, 2 * BS]
        assert pieces[1][0] == chain.fds[0] and pieces[0][0] == chain.fds[1]
        # Pieces address the same offset in every layer file: preadv/sendfile straight.
        assert pieces[2][1] == 5 * BS
    # An identical image is an empty delta.
    assert write_delta([base, tmp_path / "v2.map"], new, tmp_path / "v3") == 0


def test_readers_of_a_version_share_its_layout_built_once(tmp_path: Path) -> None:
    """Every session of a version opens a reader: the owner map of its chain (one entry per
    block, from every delta's bitmap) is built once per version, not per session; a layer
    replaced by another file is a new layout."""
    v1 = os.urandom(8 * BS)
    base = make(tmp_path / "base.raw", v1)
    v2 = bytearray(v1)
    v2[3 * BS] ^= 0xFF
    write_delta([base], make(tmp_path / "v2-full.raw", bytes(v2)), tmp_path / "v2")
    layers = [base, tmp_path / "v2.map"]
    with open_chain(layers) as a, open_chain(layers) as b:
        assert a._owner is not None and a._owner is b._owner
        # One descriptor per file for all of them: 10,000 sessions are not 10,000 fds more.
        assert a.fds == b.fds
        shared = list(a.fds)
        assert b.pread(0, b.size) == bytes(v2)
        c = open_chain(layers)
        c.close()  # another reader's close leaves the shared files open
        assert a.pread(0, a.size) == bytes(v2)
    for fd in shared:
        with pytest.raises(OSError):
            os.fstat(fd)  # the last reader's close closed them
    # The same path, another file (a version rebuilt by hand): read as it is now.
    v2[5 * BS] ^= 0xFF
    write_delta([base], make(tmp_path / "v2b-full.raw", bytes(v2)), tmp_path / "v2b")
    for ext in (".map", ".data"):
        os.replace(tmp_path / f"v2b{ext}", tmp_path / f"v2{ext}")
    with open_chain(layers) as c:
        assert c.pread(0, c.size) == bytes(v2)


def test_chain_of_three_with_growth_and_shrink(tmp_path: Path) -> None:
    v1 = os.urandom(4 * BS)
    base = make(tmp_path / "base.raw", v1)
    v2 = v1[: 2 * BS] + os.urandom(10) + v1[2 * BS + 10 :] + os.urandom(2 * BS + 7)
    write_delta([base], make(tmp_path / "n2", v2), tmp_path / "v2")
    v3 = v2[: 3 * BS + 3]  # shrink, not block aligned
    changed = write_delta([base, tmp_path / "v2.map"], make(tmp_path / "n3", v3), tmp_path / "v3")
    assert changed == 0  # a pure shrink: only the size in the map changes
    for layers, want in (
        ([base, tmp_path / "v2.map"], v2),
        ([base, tmp_path / "v2.map", tmp_path / "v3.map"], v3),
    ):
        with open_chain(layers) as chain:
            assert chain.size == len(want)
            assert chain.pread(0, chain.size) == want
            for off in (0, BS - 1, 2 * BS + 5, len(want) - 17):
                assert chain.pread(off, 17) == want[off : off + 17]


def test_malformed_layers_are_refused(tmp_path: Path) -> None:
    base = make(tmp_path / "base.raw", bytes(BS))
    bad = make(tmp_path / "bad.map", b"NOTADELTA" + bytes(40))
    with pytest.raises(LayoutError):
        open_chain([base, bad])
    with pytest.raises(LayoutError):
        open_chain([bad])
    write_delta([base], make(tmp_path / "n", os.urandom(BS)), tmp_path / "a", block_size=4096)
    write_delta([base], make(tmp_path / "m", os.urandom(BS)), tmp_path / "b", block_size=BS)
    with pytest.raises(LayoutError):
        open_chain([base, tmp_path / "a.map", tmp_path / "b.map"])


@pytest.mark.parametrize("kind", ["server-ram", "server-disk"])
async def test_write_cache_layer(tmp_path: Path, kind: str) -> None:
    image = os.urandom(4 * BS)
    base = make(tmp_path / "base.raw", image)
    wc = WriteCache(ChainBackend([base]), kind, tmp_path)
    want = bytearray(image)
    await wc.zero(BS, BS)  # whole blocks: a mark, no data
    assert await wc.pread(0, 2 * BS) == image[:BS] + bytes(BS)
    assert wc.fd < 0  # its file comes with the first data: a session that only reads has none
    want[BS : 2 * BS] = bytes(BS)
    for off, data in ((100, b"a" * 10), (4096, b"b" * 8192), (BS - 3, b"c" * 6)):
        await wc.pwrite(off, data)
        want[off : off + len(data)] = data
    await wc.zero(3 * BS + 10, 9000)
    want[3 * BS + 10 : 3 * BS + 9010] = bytes(9000)
    await wc.trim(2 * BS, BS)
    want[2 * BS : 3 * BS] = bytes(BS)
    assert await wc.pread(0, wc.size) == bytes(want)
    pieces = wc.map_read(2 * BS, BS)
    assert pieces == [(ZERO_FD, 0, BS)]  # whole trimmed blocks are only marked
    ext = await wc.extents(2 * BS, BS)
    assert ext == [(BS, STATE_HOLE | STATE_ZERO)]
    wc.close()
    assert base.read_bytes() == image
