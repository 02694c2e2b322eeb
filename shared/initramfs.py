"""Which root-over-the-network integration an initramfs carries, read from the file alone.

An initramfs is one or more cpio archives (the kernel's "newc" format) one after the other,
each plain or compressed (an uncompressed early archive with CPU microcode, then the main one
compressed). The names of its files tell whether a kernel-direct boot can attach its root:
the streamboot client (initramfs-tools' ``scripts/streamboot``, dracut's
``streambootroot``, the demo's init) or Debian's own NBD root (``scripts/local-top/nbd``). gzip and xz are
read by Python; zstd and lz4 by their command-line tools when installed.
"""

from __future__ import annotations

import contextlib
import lzma
import shutil
import subprocess
import threading
import zlib
from pathlib import Path
from typing import Literal

# More unpacked than this is not an initramfs a machine can boot (the kernel holds all of it
# in RAM): the reading stops there.
MAX_UNPACKED = 1 << 30
TOOL_TIMEOUT_S = 120.0
_CPIO_MAGICS = (b"070701", b"070702")
_TOOLS = {b"\x28\xb5\x2f\xfd": "zstd", b"\x02\x21\x4c\x18": "lz4"}
# initramfs-tools' boot script, dracut's netroot handler, the demo's own init's hand-off.
STREAMBOOT_FILES = (
    "scripts/streamboot", "sbin/streambootroot", "usr/sbin/streambootroot",
    "lib/streamboot/handoff.sh",
)  # fmt: skip
NBDROOT_FILES = ("scripts/local-top/nbd",)

Client = Literal["streamboot", "nbdroot", "none"]


class InitramfsError(Exception):
    """The file is not an initramfs this reader understands (the message says why)."""


def _cpio_names(data: bytes, at: int, names: set[str]) -> int:
    """Adds the names of the newc archive at ``at`` to ``names``; returns where it ends."""
    while True:
        if data[at : at + 6] not in _CPIO_MAGICS:
            raise InitramfsError(f"a cpio header is damaged at byte {at}")
        try:
            size = int(data[at + 54 : at + 62], 16)
            name_size = int(data[at + 94 : at + 102], 16)
        except ValueError:
            raise InitramfsError(f"a cpio header is damaged at byte {at}") from None
        name = data[at + 110 : at + 110 + name_size - 1].decode("utf-8", "replace")
        at = (at + 110 + name_size + 3) & ~3
        at = (at + size + 3) & ~3
        if at > len(data):
            raise InitramfsError("the cpio archive is cut short")
        if name == "TRAILER!!!":
            return at
        names.add(name.removeprefix("./").removeprefix("/"))


def _unpack(blob: bytes) -> bytes:
    """One compressed stream (with whatever follows it ignored by the decompressor)."""
    try:
        return _decompress(blob)
    except (zlib.error, lzma.LZMAError, EOFError) as exc:
        raise InitramfsError(f"its compressed archive is damaged ({exc})") from None


def _decompress(blob: bytes) -> bytes:
    if blob[:2] == b"\x1f\x8b":
        d = zlib.decompressobj(wbits=31)
        out = d.decompress(blob, MAX_UNPACKED)
    elif blob[:6] == b"\xfd7zXZ\x00":
        d = lzma.LZMADecompressor()
        out = d.decompress(blob, MAX_UNPACKED)
    elif (tool := _TOOLS.get(blob[:4])) is not None:
        if shutil.which(tool) is None:
            raise InitramfsError(f"it is {tool}-compressed and {tool} is not installed here")
        out = _tool_output([tool, "-dcq"], blob)
    else:
        raise InitramfsError(f"unknown compression (it starts with {blob[:4].hex()})")
    if not out:
        raise InitramfsError("its compressed archive unpacks to nothing")
    return out


def _tool_output(argv: list[str], blob: bytes) -> bytes:
    """What ``argv`` writes for ``blob`` on its input, at most MAX_UNPACKED bytes of it (the
    tool is stopped there, as the Python decompressors stop: a small file can unpack to more
    than this process's memory). Its exit status is not asked: a stream followed by padding
    makes the tools fail after writing all of it."""
    with subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    ) as proc:
        assert proc.stdin is not None and proc.stdout is not None

        def feed() -> None:
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.write(blob)  # type: ignore[union-attr]
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()  # type: ignore[union-attr]

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        killer = threading.Timer(TOOL_TIMEOUT_S, proc.kill)
        killer.start()
        try:
            out = proc.stdout.read(MAX_UNPACKED)
        finally:
            killer.cancel()
            proc.kill()
            feeder.join()
    return out


def file_names(path: Path) -> set[str]:
    """The names of every file in the initramfs at ``path``."""
    data = path.read_bytes()
    names: set[str] = set()
    at = 0
    while at < len(data):
        if data[at : at + 6] in _CPIO_MAGICS:
            at = _cpio_names(data, at, names)
        elif data[at : at + 4] == b"\0\0\0\0":
            at += 4  # padding between archives
        else:
            # A compressed archive is the last one the kernel reads to its end.
            unpacked = _unpack(data[at:])
            inner = 0
            while inner < len(unpacked) and unpacked[inner : inner + 6] in _CPIO_MAGICS:
                inner = _cpio_names(unpacked, inner, names)
                while unpacked[inner : inner + 4] == b"\0\0\0\0":
                    inner += 4
            break
    if not names:
        raise InitramfsError("it holds no files")
    return names


def root_client(path: Path) -> Client:
    """What attaches the root in the initramfs at ``path`` (``InitramfsError`` when it cannot
    be read)."""
    names = file_names(path)
    if any(n in names for n in STREAMBOOT_FILES):
        return "streamboot"
    if any(n in names for n in NBDROOT_FILES):
        return "nbdroot"
    return "none"
