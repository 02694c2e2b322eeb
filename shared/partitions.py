"""A disk image's partition table (MBR, with its logical partitions, or GPT), read from the
image file: where each partition starts and ends, and its PARTUUID as Linux names it.

Bounded against hostile images: at most 128 GPT entries of at most 4 KiB, at most 64
logical partitions, and a partition must lie inside the image.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

SECTOR = 512
MBR_ENTRY = struct.Struct("<B3sB3sII")
EXTENDED_TYPES = (0x05, 0x0F, 0x85)
GPT_PROTECTIVE = 0xEE
GPT_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")
MAX_GPT_ENTRIES = 128
MAX_LOGICAL = 64


@dataclass(frozen=True)
class Partition:
    number: int  # as Linux numbers it: 1-4 primary, 5.. logical, GPT in entry order
    start: int  # bytes from the start of the image
    size: int  # bytes
    type: str  # MBR: "0x83"; GPT: the type GUID
    partuuid: str | None


def read_partitions(path: Path) -> list[Partition] | None:
    """The partitions of the image at ``path``; None when it has no partition table."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        mbr = f.read(SECTOR)
        if len(mbr) < SECTOR or mbr[510:512] != b"\x55\xaa":
            return None
        entries = [MBR_ENTRY.unpack_from(mbr, 446 + 16 * i) for i in range(4)]
        if any(e[2] == GPT_PROTECTIVE for e in entries):
            for sector in (SECTOR, 4096):
                f.seek(sector)
                found = _gpt(f, sector, size)
                if found is not None:
                    return found
            return []
        signature = struct.unpack_from("<I", mbr, 440)[0]
        parts: list[Partition] = []
        for i, (_status, _chs, kind, _chs2, first, count) in enumerate(entries, 1):
            if kind == 0 or count == 0:
                continue
            if kind in EXTENDED_TYPES:
                parts += _logical(f, first, size, signature)
                continue
            part = _inside(i, first * SECTOR, count * SECTOR, f"0x{kind:02x}", size, signature)
            if part is not None:
                parts.append(part)
        return parts


def _inside(
    number: int, start: int, length: int, kind: str, size: int, signature: int | None
) -> Partition | None:
    if start <= 0 or length <= 0 or start + length > size:
        return None
    partuuid = f"{signature:08x}-{number:02x}" if signature is not None else None
    return Partition(number, start, length, kind, partuuid)


def _logical(f, extended_lba: int, size: int, signature: int) -> list[Partition]:  # type: ignore[no-untyped-def]
    """The logical partitions: a chain of EBRs, each naming one partition (relative to
    itself) and the next EBR (relative to the extended partition's start)."""
    parts: list[Partition] = []
    ebr_lba, seen = extended_lba, set()
    while len(parts) < MAX_LOGICAL and ebr_lba not in seen and ebr_lba * SECTOR < size:
        seen.add(ebr_lba)
        f.seek(ebr_lba * SECTOR)
        ebr = f.read(SECTOR)
        if len(ebr) < SECTOR or ebr[510:512] != b"\x55\xaa":
            break
        _s, _c, kind, _c2, first, count = MBR_ENTRY.unpack_from(ebr, 446)
        if kind and count:
            part = _inside(
                5 + len(parts), (ebr_lba + first) * SECTOR, count * SECTOR,
                f"0x{kind:02x}", size, signature,
            )  # fmt: skip
            if part is not None:
                parts.append(part)
        _s, _c, nkind, _c2, nfirst, _n = MBR_ENTRY.unpack_from(ebr, 446 + 16)
        if nkind not in EXTENDED_TYPES or nfirst == 0:
            break
        ebr_lba = extended_lba + nfirst
    return parts


def _gpt(f, sector: int, size: int) -> list[Partition] | None:  # type: ignore[no-untyped-def]
    head = f.read(GPT_HEADER.size)
    if len(head) < GPT_HEADER.size or head[:8] != b"EFI PART":
        return None
    fields = GPT_HEADER.unpack(head)
    entries_lba, count, entry_size = fields[10], fields[11], fields[12]
    if not (128 <= entry_size <= 4096 and entry_size % 8 == 0):
        return None
    if not 0 < entries_lba * sector < size:
        return None  # the entries would lie outside the image
    parts: list[Partition] = []
    f.seek(entries_lba * sector)
    table = f.read(min(count, MAX_GPT_ENTRIES) * entry_size)
    for i in range(len(table) // entry_size):
        entry = table[i * entry_size : (i + 1) * entry_size]
        kind, unique = uuid.UUID(bytes_le=entry[:16]), uuid.UUID(bytes_le=entry[16:32])
        first, last = struct.unpack_from("<QQ", entry, 32)
        if kind.int == 0 or last < first:
            continue
        start, length = first * sector, (last - first + 1) * sector
        if start <= 0 or start + length > size:
            continue
        parts.append(Partition(i + 1, start, length, str(kind), str(unique)))
    return parts
