"""On-disk layout of a vdisk version chain: a raw base image plus block deltas.

A vdisk version is a list of *layers*, oldest first:

* version 1 is a raw base image file (any name not ending in ``.map``);
* every later version adds one *delta*: ``<prefix>.map`` + ``<prefix>.data``.
  ``.data`` is a sparse file as large as the image, holding each changed block at its own
  image offset (so a byte at image offset X is at file offset X: the hot path can
  ``preadv``/``sendfile`` straight from it). ``.map`` is a 32-byte header
  (``<8sIIQQ``: magic ``SBDELTA1``, format 1, block size, image size, changed block count)
  followed by a bitmap, one bit per block (LSB first), set when ``.data`` holds the block.

A chain is passed around as its layer paths: ``[base.raw, v2.map, v3.map, ...]``; the newest
layer's size is the version's size (blocks past an older layer's end read as zeros).

API:

* ``write_delta(parent_chain, new_image_path, out_prefix) -> changed_block_count`` compares a
  full new image with the parent chain and writes ``out_prefix.map``/``.data`` holding only
  the blocks that differ (the registry uses it to publish a version).
* ``open_chain(layers) -> ChainReader``; ``reader.resolve(offset, length)`` returns the pieces
  ``(fd, file_offset, length)`` that serve a byte range, ``fd == -1`` meaning zeros;
  ``reader.pread(offset, length)`` reads bytes (tests, tools); ``reader.close()``.
"""

from __future__ import annotations

import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"SBDELTA1"
FORMAT = 1
HEADER = struct.Struct("<8sIIQQ")
DEFAULT_BLOCK_SIZE = 64 * 1024
# What a delta map may say its block size is (a sector up to 16 MiB, a power of two).
MIN_BLOCK_SIZE = 512
MAX_BLOCK_SIZE = 16 << 20
ZERO_FD = -1
# Layer index meaning "no layer holds this block": it reads as zeros.
_NONE = 255
MAX_LAYERS = 254

Piece = tuple[int, int, int]


class LayoutError(ValueError):
    """A layer file is malformed or the chain is inconsistent."""


def delta_paths(prefix: str | os.PathLike[str]) -> tuple[Path, Path]:
    """The ``(.map, .data)`` paths of the delta written under ``prefix``."""
    p = str(prefix)
    return Path(p + ".map"), Path(p + ".data")


def is_delta(layer: str | os.PathLike[str]) -> bool:
    return str(layer).endswith(".map")


class _Delta:
    def __init__(self, map_path: Path) -> None:
        raw = map_path.read_bytes()
        if len(raw) < HEADER.size:
            raise LayoutError(f"{map_path}: truncated header")
        magic, fmt, bs, size, count = HEADER.unpack_from(raw)
        if magic != MAGIC or fmt != FORMAT:
            raise LayoutError(f"{map_path}: not a delta map (magic {magic!r}, format {fmt})")
        if not (MIN_BLOCK_SIZE <= bs <= MAX_BLOCK_SIZE and bs & (bs - 1) == 0):
            raise LayoutError(f"{map_path}: block size {bs} is not a power of two in range")
        nblocks = -(-size // bs)
        bitmap = raw[HEADER.size :]
        if len(bitmap) != -(-nblocks // 8):
            raise LayoutError(f"{map_path}: bitmap length {len(bitmap)} for {nblocks} blocks")
        self.block_size: int = bs
        self.size: int = size
        self.count: int = count
        self.bitmap = bitmap
        self.data_path = map_path.with_suffix(".data")

    def has(self, block: int) -> bool:
        return bool(self.bitmap[block >> 3] & (1 << (block & 7)))


def _build_owner(size: int, bs: int, base_size: int, deltas: list[_Delta]) -> bytearray:
    """Per block: the index of the newest layer holding it (``_NONE``: zeros)."""
    nblocks = -(-size // bs)
    owner = bytearray([_NONE]) * nblocks
    owner[: min(nblocks, -(-base_size // bs))] = b"\0" * min(nblocks, -(-base_size // bs))
    for idx, d in enumerate(deltas, start=1):
        # A block past an older layer's end and absent from the delta is zero.
        tail = -(-d.size // bs)
        if tail < nblocks:
            owner[tail:] = bytes([_NONE]) * (nblocks - tail)
        for byte_i, byte in enumerate(d.bitmap):
            if not byte:
                continue
            for bit in range(8):
                if byte & (1 << bit):
                    block = byte_i * 8 + bit
                    if block < nblocks:
                        owner[block] = idx
    return owner


@dataclass(frozen=True)
class _Layout:
    """What a chain's readers share: sizes, the files read, the per-block owner map."""

    block_size: int
    size: int
    base_size: int
    data_paths: tuple[Path, ...]  # the base image, then each delta's .data
    owner: bytearray | None


# The layouts of the chains opened in this process, by their layers' identity (path,
# inode, size, mtime): a published version's layers never change, and building a chain's
# owner map reads every delta's bitmap. Each session of a version did it again: 26 ms per
# open of a 100 GiB vdisk with one 2 GiB delta, 56 ms with two, and 1.6 MiB each.
_LAYOUTS: OrderedDict[tuple[tuple[str, int, int, int], ...], _Layout] = OrderedDict()
_LAYOUTS_KEPT = 32
_layouts_lock = threading.Lock()  # readers are also made in worker threads


class _SharedFiles:
    """One read-only descriptor per layer file for every reader of the process, counted.

    A stream node holds a reader per session: a descriptor per layer per session would make
    10,000 idle sessions of one version 10,000 descriptors of the same base image, on top
    of their sockets. Every read names its offset (pread, sendfile, fadvise), so readers can
    share one. Keyed by the file's identity: a layer replaced by another file (same path,
    new inode) gets a descriptor of its own."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_key: dict[tuple[int, int, int], list[int]] = {}  # key -> [fd, users]
        self._key_of: dict[int, tuple[int, int, int]] = {}

    def acquire(self, path: Path) -> int:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino, st.st_mtime_ns)
        with self._lock:
            held = self._by_key.get(key)
            if held is None:
                self._by_key[key] = [fd, 1]
                self._key_of[fd] = key
                return fd
            held[1] += 1
        os.close(fd)  # the file is open already
        return held[0]

    def release(self, fd: int) -> None:
        with self._lock:
            key = self._key_of[fd]
            held = self._by_key[key]
            held[1] -= 1
            if held[1]:
                return
            del self._by_key[key], self._key_of[fd]
        os.close(fd)


_FILES = _SharedFiles()


def _layout(layers: list[Path]) -> _Layout:
    stats = [os.stat(p) for p in layers]
    key = tuple(
        (str(p), st.st_ino, st.st_size, st.st_mtime_ns) for p, st in zip(layers, stats, strict=True)
    )
    with _layouts_lock:
        found = _LAYOUTS.get(key)
        if found is not None:
            _LAYOUTS.move_to_end(key)
            return found
    deltas = [_Delta(p) for p in layers[1:]]
    sizes = {d.block_size for d in deltas}
    if len(sizes) > 1:
        raise LayoutError(f"mixed delta block sizes {sorted(sizes)}")
    bs = sizes.pop() if sizes else DEFAULT_BLOCK_SIZE
    base_size = stats[0].st_size
    size = deltas[-1].size if deltas else base_size
    layout = _Layout(
        block_size=bs,
        size=size,
        base_size=base_size,
        data_paths=(layers[0], *(d.data_path for d in deltas)),
        owner=_build_owner(size, bs, base_size, deltas) if deltas else None,
    )
    with _layouts_lock:
        _LAYOUTS[key] = layout
        while len(_LAYOUTS) > _LAYOUTS_KEPT:
            _LAYOUTS.popitem(last=False)
    return layout


class ChainReader:
    """Resolves image byte ranges of a version chain to (fd, file offset, length) pieces."""

    def __init__(self, layers: Sequence[str | os.PathLike[str]]) -> None:
        if not layers:
            raise LayoutError("a chain needs at least a base layer")
        if is_delta(layers[0]):
            raise LayoutError("the first layer must be a raw base image")
        if len(layers) > MAX_LAYERS:
            raise LayoutError(f"at most {MAX_LAYERS} layers")
        self.layers = [Path(p) for p in layers]
        layout = _layout(self.layers)
        self.block_size: int = layout.block_size
        self.fds: list[int] = []  # shared with the process's other readers (_SharedFiles)
        try:
            for path in layout.data_paths:
                self.fds.append(_FILES.acquire(path))
        except OSError:
            self.close()
            raise
        self.size: int = layout.size
        self._base_size = layout.base_size
        # Base only: one piece per request, no per-block lookup at all. Shared by every
        # reader of the version, read only.
        self._owner: bytearray | None = layout.owner

    def resolve(self, offset: int, length: int) -> list[Piece]:
        """Pieces serving ``[offset, offset+length)``, in order, adjacent runs merged."""
        end = offset + length
        if offset < 0 or end > self.size:
            raise ValueError(f"range {offset}+{length} outside image of {self.size} bytes")
        owner = self._owner
        if owner is None:
            if end <= self._base_size:
                return [(self.fds[0], offset, length)]
            if offset >= self._base_size:
                return [(ZERO_FD, 0, length)]
            n = self._base_size - offset
            return [(self.fds[0], offset, n), (ZERO_FD, 0, length - n)]
        bs = self.block_size
        pieces: list[Piece] = []
        pos = offset
        while pos < end:
            block = pos // bs
            who = owner[block]
            # Extend over following blocks held by the same layer.
            nxt = block + 1
            last = (end - 1) // bs
            while nxt <= last and owner[nxt] == who:
                nxt += 1
            stop = min(end, nxt * bs)
            if who == _NONE:
                pieces.append((ZERO_FD, 0, stop - pos))
            else:
                fd = self.fds[who]
                if who == 0 and stop > self._base_size:
                    # Base files need not be block aligned: its tail reads as zeros.
                    n = max(0, self._base_size - pos)
                    if n:
                        pieces.append((fd, pos, n))
                    pieces.append((ZERO_FD, 0, stop - pos - n))
                else:
                    pieces.append((fd, pos, stop - pos))
            pos = stop
        return pieces

    def pread(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        read_pieces(self.resolve(offset, length), memoryview(buf))
        return bytes(buf)

    def close(self) -> None:
        for fd in self.fds:
            _FILES.release(fd)
        self.fds = []

    def __enter__(self) -> ChainReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_pieces(pieces: Sequence[Piece], out: memoryview) -> None:
    """Fill ``out`` (zeroed by the caller where pieces are zeros) from ``pieces``."""
    pos = 0
    for fd, off, n in pieces:
        if fd != ZERO_FD:
            got = os.preadv(fd, [out[pos : pos + n]], off)
            if got != n:
                # A layer shorter than it claims: zeros beyond its end.
                out[pos + got : pos + n] = bytes(n - got)
        pos += n


def open_chain(layers: Sequence[str | os.PathLike[str]]) -> ChainReader:
    """Open a version chain (oldest layer first) for reading."""
    return ChainReader(layers)


def write_delta(
    parent_chain: Sequence[str | os.PathLike[str]],
    new_image_path: str | os.PathLike[str],
    out_prefix: str | os.PathLike[str],
    block_size: int | None = None,
) -> int:
    """Store the blocks of ``new_image_path`` that differ from the parent chain.

    Writes ``out_prefix.map`` and ``out_prefix.data`` and returns the number of changed
    blocks. The block size is the parent's deltas' (or ``block_size``, default 64 KiB).
    """
    map_path, data_path = delta_paths(out_prefix)
    with open_chain(parent_chain) as parent:
        bs = parent.block_size if len(parent.layers) > 1 else (block_size or DEFAULT_BLOCK_SIZE)
        if block_size and bs != block_size:
            raise LayoutError(f"chain block size is {bs}, not {block_size}")
        size = os.path.getsize(new_image_path)
        nblocks = -(-size // bs)
        bitmap = bytearray(-(-nblocks // 8))
        changed = 0
        with open(new_image_path, "rb") as new, open(data_path, "wb") as out:
            out.truncate(size)
            for block in range(nblocks):
                off = block * bs
                want = new.read(bs)
                n = len(want)
                if off + n <= parent.size:
                    have = parent.pread(off, n)
                else:
                    have = (
                        parent.pread(off, max(0, parent.size - off)) if off < parent.size else b""
                    )
                    have += bytes(n - len(have))
                if want != have:
                    bitmap[block >> 3] |= 1 << (block & 7)
                    if want.count(0) != n:  # zero blocks stay holes in the sparse file
                        out.seek(off)
                        out.write(want)
                    changed += 1
    map_path.write_bytes(HEADER.pack(MAGIC, FORMAT, bs, size, changed) + bytes(bitmap))
    return changed
